"""Migration in the Redis contract, on fakeredis and a real redis-server: a dead worker's
started job is handed over (places, log and record kept) when another worker can take it,
the pick takes it first with its payload restored, and every bound holds (MIGRATE_MAX, no
ready worker elsewhere, a cancel while it waits)."""

from __future__ import annotations

from typing import Any

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.store import Store
from tests.support.records import job_spec, worker_info


def spec(job_id: str) -> p.JobSpec:
    return job_spec(job_id, body={"model": "m"})


async def started_on(store: Store, worker: str, job_id: str, redis: Any) -> None:
    """``job_id`` admitted, picked and started by ``worker``, with a progress log."""
    assert (await store.jobs.admit(spec(job_id), limit=10, hold_s=30, expire_s=30)).admitted
    assert await store.routing.pick_jobs(("m",), 1, 60, worker) != []
    await store.jobs.mark_started(spec(job_id), worker, hold_s=60)
    await redis.xadd(names.log_key(job_id), {"e": b"1 started w"}, id="0-1")


async def dies(store: Store, worker: str, redis: Any) -> None:
    await store.workers.heartbeat(worker_info(worker), ttl_s=30)
    await redis.zadd(names.WORKERS, {worker: 1})  # its heartbeat expired


async def test_a_dead_workers_job_goes_to_another_worker_first_and_keeps_its_place(
    contract_redis: Any,
) -> None:
    store = Store(contract_redis, migrate_max=2)
    await store.workers.heartbeat(worker_info("alive"), ttl_s=30)
    await started_on(store, "dead", "j1", contract_redis)
    assert (await store.jobs.admit(spec("j2"), limit=10, hold_s=30, expire_s=30)).admitted
    await dies(store, "dead", contract_redis)

    assert await store.workers.reap() == (["dead"], 0, 1)
    assert await store.readings.in_system("m") == 2, "it keeps its place"
    assert await contract_redis.exists(names.in_progress_key("j1")) == 0
    moves = await contract_redis.hgetall(names.moves_key("j1"))
    assert (moves[b"n"], moves[b"why"]) == (b"1", b"worker_lost")
    assert await contract_redis.zrange(names.model_resume_key("m"), 0, -1) == [
        b"normal:anonymous:j1"
    ]
    assert await contract_redis.exists(names.log_key("j1")) == 1, "its progress is kept"
    listed = await store.records.migrating_jobs()
    assert [(job, model, key) for job, model, key, _ in listed] == [("j1", "m", "anonymous")]

    result = await store.routing.pick(("m",), 1, 60, "alive")
    assert [(j.id, j.moves) for j in result.jobs] == [("j1", 1)], "before the job queued first"
    assert await contract_redis.exists(names.job_key("j1")) == 1, "its payload restored"
    assert await contract_redis.exists(names.in_progress_key("j1")) == 1
    assert await contract_redis.hexists(names.moves_key("j1"), "p") == 0
    assert await contract_redis.zcard(names.model_resume_key("m")) == 0
    assert [(j.id, j.moves) for j in (await store.routing.pick(("m",), 1, 60, "alive")).jobs] == [
        ("j2", 0)
    ]

    await store.jobs.mark_started(spec("j1"), "alive", hold_s=60)
    await store.jobs.release(spec("j1"), "alive", None, p.Outcome.COMPLETED)
    assert await contract_redis.exists(names.moves_key("j1"), names.log_key("j1")) == 0


async def test_with_nowhere_to_go_or_after_migrate_max_it_ends_worker_lost(
    contract_redis: Any,
) -> None:
    store = Store(contract_redis, migrate_max=1)
    await started_on(store, "dead", "alone", contract_redis)
    await dies(store, "dead", contract_redis)
    assert await store.workers.reap() == (["dead"], 1, 0), "no other worker: ended"
    assert await contract_redis.exists(names.log_key("alone"), names.moves_key("alone")) == 0

    await store.workers.heartbeat(worker_info("b"), ttl_s=30)
    await started_on(store, "a", "twice", contract_redis)
    await dies(store, "a", contract_redis)
    assert await store.workers.reap() == (["a"], 0, 1)
    assert [j.id for j in (await store.routing.pick(("m",), 1, 60, "b")).jobs] == ["twice"]
    await store.jobs.mark_started(spec("twice"), "b", hold_s=60)
    await store.workers.heartbeat(worker_info("c"), ttl_s=30)
    await dies(store, "b", contract_redis)
    assert await store.workers.reap() == (["b"], 1, 0), "MIGRATE_MAX reached"
    assert await store.readings.in_system("m") == 0
    assert (await store.records.outcome("twice") or {})["outcome"] == "worker_lost"


async def test_migrate_off_ends_every_job_as_before(contract_redis: Any) -> None:
    store = Store(contract_redis)  # migrate_max 0: MIGRATE off
    await store.workers.heartbeat(worker_info("alive"), ttl_s=30)
    await started_on(store, "dead", "j", contract_redis)
    await dies(store, "dead", contract_redis)
    assert await store.workers.reap() == (["dead"], 1, 0)


async def test_a_worker_hands_a_job_over_in_two_steps(contract_redis: Any) -> None:
    """HAND_OVER leaves it in nobody's queue (arq has not finished its run yet); RESUME
    queues it; the pick waits while arq's in-progress marker is still there."""
    store = Store(contract_redis)
    await store.workers.heartbeat(worker_info("other"), ttl_s=30)
    await store.workers.heartbeat(worker_info("me"), ttl_s=30)
    await started_on(store, "me", "j", contract_redis)
    assert await store.migration.hand_over(spec("j"), "me", "engine_error", 2)
    assert await contract_redis.hlen(names.worker_jobs_key("me")) == 0
    assert await contract_redis.zcard(names.model_resume_key("m")) == 0
    assert await store.migration.why("j") == "engine_error"
    assert await store.migration.resume(spec("j"))
    waiting = await store.routing.pick(("m",), 1, 60, "other")
    assert waiting.jobs == [], "arq's run still marks it in progress"
    await contract_redis.delete(names.in_progress_key("j"), names.job_key("j"))  # arq's end
    await contract_redis.zrem(names.QUEUE, "j")
    assert [j.id for j in (await store.routing.pick(("m",), 1, 60, "other")).jobs] == ["j"]
    assert await contract_redis.zscore(names.QUEUE, "j") is not None, "back in arq's queue"


async def test_no_hand_over_without_another_ready_worker_or_past_the_limit(
    contract_redis: Any,
) -> None:
    store = Store(contract_redis)
    await store.workers.heartbeat(worker_info("me"), ttl_s=30)
    await store.workers.heartbeat(worker_info("busy", engine_ready=False), ttl_s=30)
    await store.workers.heartbeat(worker_info("other-model", models=("x",)), ttl_s=30)
    await started_on(store, "me", "j", contract_redis)
    assert not await store.migration.hand_over(spec("j"), "me", "drain", 2)
    await store.workers.heartbeat(worker_info("ready"), ttl_s=30)
    assert not await store.migration.hand_over(spec("j"), "me", "drain", 0), "MIGRATE off"
    assert await store.migration.hand_over(spec("j"), "me", "drain", 2)


async def test_a_job_cancelled_while_it_waits_to_be_resumed_never_runs(
    contract_redis: Any,
) -> None:
    store = Store(contract_redis, migrate_max=2)
    await store.workers.heartbeat(worker_info("alive"), ttl_s=30)
    await started_on(store, "dead", "j", contract_redis)
    await dies(store, "dead", contract_redis)
    assert await store.workers.reap() == (["dead"], 0, 1)
    assert await store.jobs.cancel(spec("j")), "not running: it never runs again"
    assert await contract_redis.exists(names.moves_key("j"), names.log_key("j")) == 0
    assert (await store.routing.pick(("m",), 1, 60, "alive")).jobs == []
    assert await contract_redis.zcard(names.model_resume_key("m")) == 0
    assert await store.readings.in_system("m") == 0
