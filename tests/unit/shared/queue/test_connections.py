"""Connections (REDIS_URL or Sentinel) and replication acknowledgements (WAIT), on a real
redis-server: WAIT is Redis' (a standalone server has no replica to acknowledge)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool

from llmq.shared.errors import QueueUnavailable
from llmq.shared.queue import names
from llmq.shared.queue.connections import redis_pool
from llmq.shared.queue.failover import confirm_replicated
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from tests.support.records import job_spec
from tests.support.stack import Proc


@pytest.fixture
async def real_redis(redis_server: Proc) -> AsyncIterator[Redis]:
    client = Redis(port=redis_server.port)
    await client.flushall()
    yield client
    await client.aclose()


def test_sentinels_are_host_port_pairs() -> None:
    s = Settings(redis_sentinels="s1:26379, 10.0.0.2:26380,[::1]:26381")
    assert s.sentinel_addresses() == [("s1", 26379), ("10.0.0.2", 26380), ("::1", 26381)]
    assert Settings().sentinel_addresses() == []
    for bad in ("s1", "s1:port", ":26379", "s1:70000"):
        with pytest.raises(ValueError, match="host:port"):
            Settings(redis_sentinels=bad)


async def test_with_sentinels_the_pool_asks_them_for_the_primary() -> None:
    s = Settings(
        redis_url="redis://ignored:1/3",
        redis_sentinels="127.0.0.1:1",
        redis_sentinel_master="prod",
        redis_username="gateway",
        redis_password="secret-1234567890",
    )
    pool = redis_pool(s, timeout=1.0)
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "prod"
    assert pool.connection_kwargs["db"] == 3, "REDIS_URL's database still applies"
    assert pool.connection_kwargs["username"] == "gateway"
    assert pool.connection_kwargs["socket_timeout"] == 1.0
    await pool.disconnect()
    plain = redis_pool(Settings(redis_url="redis://127.0.0.1:6390/2"))
    assert not isinstance(plain, SentinelConnectionPool)
    assert plain.connection_kwargs["db"] == 2
    assert "socket_timeout" not in plain.connection_kwargs, "pub/sub reads wait on purpose"


async def test_confirm_replicated_needs_the_replicas_it_asks_for(real_redis: Redis) -> None:
    await confirm_replicated(real_redis, 0, 0.05)  # no WAIT asked: nothing happens
    with pytest.raises(QueueUnavailable, match="1 Redis replica"):
        await confirm_replicated(real_redis, 1, 0.05)


async def test_an_admission_no_replica_acknowledged_is_taken_back(real_redis: Redis) -> None:
    """REDIS_MIN_REPLICAS_ACK=1 on a primary without replicas: 503, and nothing of the job
    is left to run (a failover could have lost it, so it never starts)."""
    store = Store(real_redis, replicas_ack=1, wait_timeout_s=0.05)
    spec = job_spec("j1")
    with pytest.raises(QueueUnavailable, match="replica"):
        await store.jobs.admit(spec, limit=10, hold_s=30, expire_s=30)
    assert await real_redis.exists(names.job_key("j1")) == 0
    assert await real_redis.zcard(names.QUEUE) == 0
    assert await store.readings.in_system("m") == 0
    assert (await store.readings.depth(["m"]))["m"]["normal"] == 0
    without = Store(real_redis)
    assert (await without.jobs.admit(job_spec("j2"), limit=10, hold_s=30, expire_s=30)).admitted


def test_the_wait_must_end_before_the_command_bound() -> None:
    """WAIT answers after its timeout: at or past REDIS_TIMEOUT_S the read fails with the
    job admitted and its client told 503."""
    with pytest.raises(ValueError, match="REDIS_WAIT_TIMEOUT_S"):
        Settings(redis_min_replicas_ack=1, redis_wait_timeout_s=1.0, redis_timeout_s=1.0)
    assert Settings(redis_min_replicas_ack=1).redis_wait_timeout_s < Settings().redis_timeout_s
