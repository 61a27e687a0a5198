"""The Redis-contract tests run twice: on fakeredis (with Lua) and on a real redis-server,
because the Lua scripts' semantics are Redis', not the fake's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from llmq.shared.queue.store import Store
from tests.support.stack import Proc


@pytest.fixture(params=["fakeredis", "redis-server"])
async def contract_redis(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """The Redis of a contract test: fakeredis, then a real redis-server (each test runs
    on both)."""
    if request.param == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis()
    else:
        server: Proc = request.getfixturevalue("redis_server")
        client = Redis(port=server.port)
        await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def store(contract_redis: Any) -> Store:
    return Store(contract_redis)
