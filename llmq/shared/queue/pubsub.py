"""Reading a pub/sub connection that may die silently: the one loop both processes use
(the gateway's event reader, the worker's wake listener).

A connection to a Redis that froze, or whose host vanished, raises nothing: reads just
time out. So a connection silent for ``PING_S`` is sent a PING, and one that has answered
nothing within ``DEAD_AFTER_S`` counts as lost: ``listen`` raises ``ConnectionError`` and
the caller reconnects and re-subscribes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError

PING_S = 1.0
DEAD_AFTER_S = 3.0


def closed_transport(exc: BaseException) -> bool:
    """uvloop's error for a write on a socket the peer closed (a Redis that died): redis-py
    passes it on as a RuntimeError instead of its ConnectionError."""
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


@contextmanager
def connection_errors() -> Iterator[None]:
    """Raise a write on a closed socket as redis-py's ConnectionError (a RedisError), so
    the code that handles a lost Redis handles it."""
    try:
        yield
    except RuntimeError as exc:
        if closed_transport(exc):
            raise RedisConnectionError(f"the connection to Redis is closed ({exc})") from exc
        raise


async def listen(pubsub: PubSub, on_message: Callable[[dict[str, Any]], None]) -> None:
    """Hand every message of ``pubsub`` to ``on_message`` (its subscribe confirmations and
    PONGs too, unless the PubSub ignores them) until the connection fails or stops
    answering; raises the error (``ConnectionError`` for silence)."""
    with connection_errors():
        await _listen(pubsub, on_message)


async def _listen(pubsub: PubSub, on_message: Callable[[dict[str, Any]], None]) -> None:
    loop = asyncio.get_running_loop()
    heard = loop.time()
    pinged = False
    while True:
        msg = await pubsub.get_message(timeout=PING_S)
        now = loop.time()
        if msg is not None:
            heard, pinged = now, False
            on_message(msg)
        elif now - heard >= DEAD_AFTER_S:
            raise ConnectionError(f"no answer from Redis for {now - heard:.1f}s")
        elif not pinged and now - heard >= PING_S:
            await pubsub.ping()
            pinged = True
