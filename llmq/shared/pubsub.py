"""Reading a pub/sub connection that may die silently: the one loop both processes use
(the gateway's event reader, the worker's wake listener).

A connection to a Redis that froze, or whose host vanished, raises nothing: reads just
time out. So a connection silent for ``PING_S`` is sent a PING, and one that has answered
nothing within ``DEAD_AFTER_S`` counts as lost: ``listen`` raises ``ConnectionError`` and
the caller reconnects and re-subscribes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio.client import PubSub

PING_S = 1.0
DEAD_AFTER_S = 3.0


async def listen(pubsub: PubSub, on_message: Callable[[dict[str, Any]], None]) -> None:
    """Hand every message of ``pubsub`` to ``on_message`` (its subscribe confirmations and
    PONGs too, unless the PubSub ignores them) until the connection fails or stops
    answering; raises the error (``ConnectionError`` for silence)."""
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
