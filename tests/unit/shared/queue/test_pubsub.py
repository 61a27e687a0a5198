"""A write on a socket the Redis server closed, as uvloop reports it (a RuntimeError that
redis-py passes on), counts as a lost connection; any other RuntimeError stays a bug."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from llmq.shared.queue.pubsub import closed_transport, connection_errors

CLOSED = RuntimeError(
    "unable to perform operation on <TCPTransport closed=True reading=False 0x1>; "
    "the handler is closed"
)


def test_a_write_on_a_closed_socket_is_a_redis_connection_error() -> None:
    assert closed_transport(CLOSED)
    with pytest.raises(RedisConnectionError, match="closed"), connection_errors():
        raise CLOSED


def test_other_runtime_errors_pass_through() -> None:
    assert not closed_transport(RuntimeError("something else"))
    with pytest.raises(RuntimeError, match="something else"), connection_errors():
        raise RuntimeError("something else")
