"""The Redis contract's atomic operations, on fakeredis with Lua."""

from __future__ import annotations

import asyncio
import json
import time

from llmq.shared import protocol as p
from llmq.shared.store import Store


def spec(job_id: str) -> p.JobSpec:
    return p.JobSpec(
        id=job_id,
        model="m",
        stream=True,
        include_usage=False,
        enqueued_at_ms=int(time.time() * 1000),
        body={"model": "m"},
    )


async def test_admit_enqueues_json_job_until_the_limit(store: Store, fake_redis) -> None:
    results = [await store.admit(spec(f"j{i}"), limit=3, hold_s=30, expire_s=30) for i in range(5)]
    assert [r.admitted for r in results] == [True, True, True, False, False]
    assert [r.in_system for r in results] == [1, 2, 3, 3, 3]
    assert await fake_redis.zcard(p.QUEUE) == 3
    job = json.loads(await fake_redis.get(p.job_key("j0")))
    assert job["f"] == "chat"
    assert job["a"][0]["id"] == "j0"
    assert 0 < await fake_redis.pttl(p.job_key("j0")) <= 30_000


async def test_admit_refuses_a_duplicate_id(store: Store) -> None:
    assert (await store.admit(spec("same"), limit=5, hold_s=30, expire_s=30)).admitted
    again = await store.admit(spec("same"), limit=5, hold_s=30, expire_s=30)
    assert again.duplicate
    assert not again.admitted


async def test_places_of_dead_jobs_heal_after_their_hold(store: Store) -> None:
    await store.admit(spec("a"), limit=1, hold_s=0.05, expire_s=30)
    assert not (await store.admit(spec("b"), limit=1, hold_s=30, expire_s=30)).admitted
    await asyncio.sleep(0.1)
    assert (await store.admit(spec("b"), limit=1, hold_s=30, expire_s=30)).admitted


async def test_mark_started_rearms_only_admitted_jobs(store: Store, fake_redis) -> None:
    await store.admit(spec("a"), limit=5, hold_s=0.05, expire_s=30)
    await store.mark_started("a", hold_s=30)
    await store.mark_started("ghost", hold_s=30)
    await asyncio.sleep(0.1)
    assert await store.in_system() == 1
    assert await fake_redis.zscore(p.ADMITTED, "ghost") is None


async def test_cancel_before_start_removes_every_trace(store: Store, fake_redis) -> None:
    await store.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    assert await store.cancel("a") is True
    assert await fake_redis.exists(p.job_key("a")) == 0
    assert await fake_redis.zcard(p.QUEUE) == 0
    assert await store.in_system() == 0


async def test_cancel_of_running_job_requests_arq_abort_and_wakes(store: Store, fake_redis) -> None:
    await store.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    await fake_redis.set(p.in_progress_key("a"), b"1")
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(p.WAKE_CHANNEL)
    await pubsub.get_message(timeout=1)
    assert await store.cancel("a") is False
    assert await fake_redis.zscore(p.ABORT, "a") is not None
    assert await fake_redis.zcard(p.QUEUE) == 1  # arq removes it when the task ends
    msg = await pubsub.get_message(timeout=1)
    assert msg is not None
    assert msg["data"] == b"a"
    await pubsub.aclose()


async def test_queue_depth_counts_only_waiting_jobs(store: Store, fake_redis) -> None:
    for i in range(4):
        await store.admit(spec(f"j{i}"), limit=10, hold_s=30, expire_s=30)
    await fake_redis.set(p.in_progress_key("j1"), b"1")
    assert await store.queue_depth() == 3
    assert await store.in_system() == 4


async def test_heartbeats_expire_and_workers_can_leave(store: Store) -> None:
    info = p.WorkerInfo(
        worker_id="w1",
        max_active=4,
        active=1,
        models=("m",),
        engine_ready=True,
        engine_url="http://e",
        started_at=1.0,
    )
    await store.heartbeat(info, ttl_s=30)
    await store.heartbeat(info.model_copy(update={"worker_id": "w2"}), ttl_s=0.05)
    assert {w.worker_id for w in await store.live_workers()} == {"w1", "w2"}
    await asyncio.sleep(0.1)
    assert [w.worker_id for w in await store.live_workers()] == ["w1"]
    assert (await store.live_workers())[0] == info
    await store.remove_worker("w1")
    assert await store.live_workers() == []


async def test_waiting_jobs_skips_running_and_not_yet_due(store: Store, fake_redis) -> None:
    for i in range(4):
        await store.admit(spec(f"j{i}"), limit=10, hold_s=30, expire_s=30)
    await fake_redis.set(p.in_progress_key("j0"), b"1")
    await fake_redis.zadd(p.QUEUE, {"later": int(time.time() * 1000) + 60_000})
    assert await store.waiting_jobs(10) == [b"j1", b"j2", b"j3"]
    assert await store.waiting_jobs(2) == [b"j1", b"j2"]
