from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from llmq.shared.queue.store import Store


@pytest.fixture
async def fake_redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    r = fakeredis.FakeAsyncRedis()
    yield r
    await r.aclose()


@pytest.fixture
def store(fake_redis: fakeredis.FakeAsyncRedis) -> Store:
    return Store(fake_redis)
