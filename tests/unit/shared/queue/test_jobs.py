"""The Redis contract's atomic operations, each run on fakeredis (with Lua) and on a real
redis-server: the Lua scripts' semantics are Redis', not the fake's.

Expiry is made to happen by moving a deadline into the past (the scores are deadlines on
Redis' clock), not by sleeping past it.
"""

from __future__ import annotations

import json
import time

from arq.jobs import Job, JobStatus

from llmq.shared import protocol as p
from llmq.shared.errors import ServiceError, WorkerLost
from llmq.shared.queue import names
from llmq.shared.queue.jobs import AdmitStatus
from llmq.shared.queue.store import Store
from tests.support.records import job_spec, worker_info

PAST = 1  # a deadline long gone (ms since the epoch)


def spec(job_id: str) -> p.JobSpec:
    return job_spec(job_id)


async def picked(store: Store, limit: int) -> list[str]:
    """Ids the pick script returns (and claims)."""
    return [
        job_id for job_id, _score in await store.routing.pick_jobs(("m",), limit, in_progress_s=60)
    ]


async def test_admit_enqueues_json_job_until_the_limit(store: Store, contract_redis) -> None:
    results = [
        await store.jobs.admit(spec(f"j{i}"), limit=3, hold_s=30, expire_s=30) for i in range(5)
    ]
    assert [r.admitted for r in results] == [True, True, True, False, False]
    assert [r.in_system for r in results] == [1, 2, 3, 3, 3]
    assert await contract_redis.zcard(names.QUEUE) == 3
    job = json.loads(await contract_redis.get(names.job_key("j0")))
    assert job["f"] == "chat"
    assert job["a"][0]["id"] == "j0"
    assert 0 < await contract_redis.pttl(names.job_key("j0")) <= 30_000


async def test_admit_refuses_a_duplicate_id(store: Store) -> None:
    assert (await store.jobs.admit(spec("same"), limit=5, hold_s=30, expire_s=30)).admitted
    again = await store.jobs.admit(spec("same"), limit=5, hold_s=30, expire_s=30)
    assert again.status == AdmitStatus.DUPLICATE
    assert not again.admitted


async def test_places_of_dead_jobs_heal_after_their_hold(store: Store, contract_redis) -> None:
    await store.jobs.admit(spec("a"), limit=1, hold_s=30, expire_s=30)
    assert not (await store.jobs.admit(spec("b"), limit=1, hold_s=30, expire_s=30)).admitted
    await contract_redis.zadd(
        names.model_admitted_key("m"), {"a": PAST}
    )  # its hold ran out (its gateway died)
    assert (await store.jobs.admit(spec("b"), limit=1, hold_s=30, expire_s=30)).admitted
    assert await contract_redis.zrange(names.model_admitted_key("m"), 0, -1) == [b"b"]


async def test_mark_started_rearms_only_admitted_jobs(store: Store, contract_redis) -> None:
    await store.jobs.admit(spec("a"), limit=5, hold_s=1, expire_s=30)
    held_until = await contract_redis.zscore(names.model_admitted_key("m"), "a")
    await store.jobs.mark_started(spec("a"), "w1", hold_s=300)
    await store.jobs.mark_started(spec("ghost"), "w1", hold_s=300)
    assert await contract_redis.zscore(names.model_admitted_key("m"), "a") >= held_until + 250_000
    assert await contract_redis.zscore(names.model_admitted_key("m"), "ghost") is None
    assert await store.readings.in_system("m") == 1


async def test_a_started_job_keeps_its_payload_while_it_may_run(
    store: Store, contract_redis
) -> None:
    """The payload expires QUEUE_TIMEOUT_S after the enqueue only if the job never starts;
    once started it is kept as long as the job may run (regression: llmq-jobs show lost a
    job that ran longer than the queue timeout)."""
    await store.jobs.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    await store.jobs.mark_started(spec("a"), "w1", hold_s=300)
    assert 300_000 < await contract_redis.pttl(names.job_key("a")) <= 310_000
    await contract_redis.pexpire(names.job_key("a"), 900_000)  # a longer expiry (a batch's) is kept
    await store.jobs.mark_started(spec("a"), "w1", hold_s=300)
    assert await contract_redis.pttl(names.job_key("a")) > 800_000


async def test_cancel_before_start_removes_every_trace(store: Store, contract_redis) -> None:
    await store.jobs.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    assert await store.jobs.cancel(spec("a")) is True
    assert await contract_redis.exists(names.job_key("a")) == 0
    assert await contract_redis.zcard(names.QUEUE) == 0
    assert await store.readings.in_system("m") == 0


async def test_cancel_of_running_job_requests_arq_abort_and_wakes(
    store: Store, contract_redis
) -> None:
    await store.jobs.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    await contract_redis.set(names.in_progress_key("a"), b"1")
    pubsub = contract_redis.pubsub()
    await pubsub.subscribe(names.WAKE_CHANNEL)
    await pubsub.get_message(timeout=1)
    assert await store.jobs.cancel(spec("a")) is False
    assert await contract_redis.zscore(names.ABORT, "a") is not None
    assert await contract_redis.zcard(names.QUEUE) == 1  # arq removes it when the task ends
    msg = await pubsub.get_message(timeout=1)
    assert msg is not None
    assert msg["data"] == b"a"
    await pubsub.aclose()


async def test_queue_depth_counts_only_waiting_jobs(store: Store, contract_redis) -> None:
    for i in range(4):
        await store.jobs.admit(spec(f"j{i}"), limit=10, hold_s=30, expire_s=30)
    await contract_redis.set(names.in_progress_key("j1"), b"1")
    assert await store.readings.queue_depth() == 3
    assert await store.readings.in_system("m") == 4


async def test_heartbeats_expire_and_workers_can_leave(store: Store, contract_redis) -> None:
    info = worker_info("w1", max_active=4, active=1)
    await store.workers.heartbeat(info, ttl_s=30)
    await store.workers.heartbeat(info.model_copy(update={"worker_id": "w2"}), ttl_s=30)
    assert {w.worker_id for w in await store.readings.live_workers()} == {"w1", "w2"}
    assert 0 < await contract_redis.pttl(names.worker_key("w2")) <= 30_000
    await contract_redis.zadd(names.WORKERS, {"w2": PAST})  # w2 stopped beating
    assert [w.worker_id for w in await store.readings.live_workers()] == ["w1"]
    assert await contract_redis.zscore(names.WORKERS, "w2") == PAST, "left for the reaper"
    assert (await store.readings.live_workers())[0] == info
    await store.workers.remove_worker("w1")
    assert await store.readings.live_workers() == []


async def test_pick_skips_running_and_expired_jobs(store: Store, contract_redis) -> None:
    for i in range(4):
        await store.jobs.admit(spec(f"j{i}"), limit=10, hold_s=30, expire_s=30)
    await contract_redis.set(names.in_progress_key("j0"), b"1")
    await contract_redis.delete(names.job_key("j1"))  # expired: its gateway died before it ran
    assert await picked(store, 1) == ["j2"]
    assert 0 < await contract_redis.pttl(names.in_progress_key("j2")) <= 60_000, "claimed for arq"
    assert await picked(store, 10) == ["j3"]
    assert await picked(store, 10) == []


async def test_pick_returns_queue_scores_and_drops_jobs_no_longer_queued(
    store: Store, contract_redis
) -> None:
    for name in ("gone", "kept"):
        await store.jobs.admit(spec(name), limit=10, hold_s=30, expire_s=30)
    await contract_redis.zrem(names.QUEUE, "gone")  # left the queue (arq finished it elsewhere)
    # the gateway that enqueued "kept" has a clock a minute ahead of this worker's
    await contract_redis.zadd(names.QUEUE, {"kept": int(time.time() * 1000) + 60_000})
    [(job_id, score)] = await store.routing.pick_jobs(("m",), 10, in_progress_s=5)
    assert job_id == "kept"
    assert score == await contract_redis.zscore(names.QUEUE, "kept")
    assert not await contract_redis.exists(names.in_progress_key("gone"))
    assert (await store.readings.depth(["m"]))["m"] == {"high": 0, "normal": 0, "low": 0}


def _worker(worker_id: str) -> p.WorkerInfo:
    return worker_info(worker_id, active=1)


async def test_release_forgets_the_job_everywhere_the_worker_recorded_it(
    store: Store, contract_redis
) -> None:
    await store.jobs.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    await store.jobs.mark_started(spec("a"), "w1", hold_s=300)
    assert await contract_redis.hgetall(names.worker_jobs_key("w1")) == {
        b"a": b'["anonymous","m","normal"]'
    }
    await store.jobs.release(spec("a"), "w1", None, p.Outcome.COMPLETED)
    assert json.loads(await contract_redis.get(names.outcome_key("a"))) == {
        "outcome": "completed",
        "worker": "w1",
    }
    assert await contract_redis.hgetall(names.worker_jobs_key("w1")) == {}
    assert await store.readings.in_system("m") == 0


async def test_reaper_reclaims_a_dead_workers_jobs_and_tells_their_clients(
    store: Store, contract_redis
) -> None:
    for job in ("run1", "run2", "queued", "other"):
        await store.jobs.admit(spec(job), limit=10, hold_s=30, expire_s=30)
    await store.workers.heartbeat(_worker("dead"), ttl_s=30)
    await store.workers.heartbeat(_worker("alive"), ttl_s=30)
    for job, worker in (("run1", "dead"), ("run2", "dead"), ("other", "alive")):
        await contract_redis.set(names.in_progress_key(job), b"1")
        await store.jobs.mark_started(spec(job), worker, hold_s=300)
    pubsub = contract_redis.pubsub()
    await pubsub.subscribe(names.events_channel("run1"))
    await pubsub.get_message(timeout=1)

    assert await store.workers.reap() == ([], 0, 0), "nobody is dead yet"
    await contract_redis.zadd(names.WORKERS, {"dead": PAST})  # its heartbeat expired
    assert [w.worker_id for w in await store.readings.live_workers()] == ["alive"]
    assert await store.workers.reap() == (["dead"], 2, 0)

    assert sorted(await contract_redis.zrange(names.model_admitted_key("m"), 0, -1)) == [
        b"other",
        b"queued",
    ]
    assert sorted(await contract_redis.zrange(names.QUEUE, 0, -1)) == [b"other", b"queued"]
    for job in ("run1", "run2"):  # started jobs never run again
        assert await contract_redis.exists(names.in_progress_key(job), names.job_key(job)) == 0
    assert await contract_redis.exists(names.job_key("queued")) == 1, "a queued job still runs"
    assert await contract_redis.exists(names.worker_jobs_key("dead"), names.worker_key("dead")) == 0
    assert await contract_redis.zscore(names.WORKERS, "dead") is None
    msg = await pubsub.get_message(timeout=1)
    assert msg is not None
    event = p.Event.decode(msg["data"])
    assert (event.seq, event.type) == (p.OUT_OF_BAND, p.EventType.ERROR)
    lost = ServiceError.from_wire(json.loads(event.data))
    assert (type(lost), lost.status) == (WorkerLost, 502)
    await pubsub.aclose()
    assert await store.workers.reap() == ([], 0, 0), "idempotent"


async def test_arq_reads_an_admitted_job_and_sees_the_picks_claim(
    store: Store, contract_redis
) -> None:
    """The admit script writes arq's payload (arq's own serializer) and the pick script
    claims it as arq's start_jobs would: arq's Job API reads both back. (The Lua reads the
    payload's format, and the worker skips arq's claim: an arq change shows here.)"""
    job = spec("a")
    await store.jobs.admit(job, limit=5, hold_s=30, expire_s=30)
    arq_job = Job("a", contract_redis, _queue_name=names.QUEUE, _deserializer=p.json_loads)
    assert await arq_job.status() == JobStatus.queued
    info = await arq_job.info()
    assert info is not None
    assert info.function == p.JOB_FUNCTION
    assert p.JobSpec.model_validate(info.args[0]) == job
    assert info.job_try == 1
    assert await picked(store, 1) == ["a"]
    assert await arq_job.status() == JobStatus.in_progress, "claimed: arq's in-progress key"


async def test_metadata_is_set_only_while_the_record_lives(store: Store, contract_redis) -> None:
    await contract_redis.hset(names.stored_key("s"), mapping={"id": "s"})
    assert await store.records.set_metadata("s", {"team": "a"})
    assert await contract_redis.hget(names.stored_key("s"), "metadata") == b'{"team": "a"}'
    assert not await store.records.set_metadata("gone", {"team": "a"})
    assert await contract_redis.exists(names.stored_key("gone")) == 0, "no record recreated"


async def test_forgetting_a_job_tells_a_client_still_waiting(store: Store, contract_redis) -> None:
    """A job that ended while its worker could not reach Redis (after a failover, its
    client waits on the new primary, whose events were lost with the old one): the clean-up
    publishes an out-of-band queue_unavailable, so the client is answered, not left waiting
    for QUEUE_TIMEOUT_S."""
    await store.jobs.admit(spec("a"), limit=5, hold_s=30, expire_s=30)
    pubsub = contract_redis.pubsub()
    await pubsub.subscribe(names.events_channel("a"))
    await pubsub.get_message(timeout=1)
    await store.jobs.forget(spec("a"), "w1")
    msg = await pubsub.get_message(timeout=1)
    assert msg is not None
    event = p.Event.decode(msg["data"])
    assert event.seq == p.OUT_OF_BAND
    assert json.loads(event.data)["code"] == "queue_unavailable"
    assert await store.readings.in_system("m") == 0
    await pubsub.aclose()
