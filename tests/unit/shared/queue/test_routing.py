"""Routing by model in the Redis contract, on fakeredis and a real redis-server: each model
has its own queue and bound, a worker picks only its engine's models and shares its slots
among them, and what the reaper, the heartbeat and the drain counter keep per model."""

from __future__ import annotations

import time

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.store import Store
from tests.support.records import job_spec, worker_info


def spec(job_id: str, model: str, **kw: object) -> p.JobSpec:
    return job_spec(job_id, model=model, body={"model": model}, **kw)


async def admit(store: Store, job_id: str, model: str, limit: int = 10) -> bool:
    result = await store.jobs.admit(spec(job_id, model), limit=limit, hold_s=30, expire_s=30)
    return result.admitted


async def picked(store: Store, models: tuple[str, ...], limit: int) -> list[str]:
    return [i for i, _ in await store.routing.pick_jobs(models, limit, in_progress_s=60)]


async def test_a_worker_picks_only_the_models_its_engine_serves(store: Store) -> None:
    for i in range(3):
        assert await admit(store, f"a{i}", "alpha")
        assert await admit(store, f"b{i}", "beta")
    assert await picked(store, ("alpha",), 10) == ["a0", "a1", "a2"]
    assert await picked(store, ("gamma",), 10) == []
    assert await picked(store, (), 10) == []
    assert await picked(store, ("beta",), 10) == ["b0", "b1", "b2"]


async def test_a_worker_serving_two_models_shares_its_slots_between_them(store: Store) -> None:
    """One slot at a time, the model served least recently goes first: alternation, even
    when one model's jobs were all queued before the other's."""
    for i in range(4):
        assert await admit(store, f"a{i}", "alpha")
    for i in range(4):
        assert await admit(store, f"b{i}", "beta")
    order = [(await picked(store, ("alpha", "beta"), 1))[0] for _ in range(8)]
    assert [j[0] for j in order] == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert [j for j in order if j[0] == "a"] == ["a0", "a1", "a2", "a3"], "FIFO within a model"


async def test_a_higher_band_goes_first_whatever_its_model(store: Store) -> None:
    assert await admit(store, "a-low", "alpha")
    high = spec("b-high", "beta", band=p.Band.HIGH)
    assert (await store.jobs.admit(high, limit=10, hold_s=30, expire_s=30)).admitted
    assert await picked(store, ("alpha", "beta"), 1) == ["b-high"]


async def test_each_model_has_its_own_bound(store: Store) -> None:
    """A model at its limit refuses; another model with the same limit still admits."""
    assert await admit(store, "a0", "alpha", limit=2)
    assert await admit(store, "a1", "alpha", limit=2)
    assert not await admit(store, "a2", "alpha", limit=2)
    assert await admit(store, "b0", "beta", limit=2)
    assert await store.readings.in_system("alpha") == 2
    assert await store.readings.in_system("beta") == 1
    load = await store.readings.load(["alpha", "beta", "never"])
    assert (load["alpha"].waiting, load["beta"].waiting, load["never"].waiting) == (2, 1, 0)
    assert load["alpha"].waiting_by_band == {"high": 0, "normal": 2, "low": 0}


async def test_a_job_ending_frees_its_models_place_and_counts_as_drained(
    store: Store, contract_redis
) -> None:
    assert await admit(store, "a0", "alpha", limit=1)
    assert await picked(store, ("alpha",), 1) == ["a0"]
    await store.jobs.mark_started(spec("a0", "alpha"), "w1", hold_s=60)
    await store.jobs.release(spec("a0", "alpha"), "w1", None, p.Outcome.COMPLETED)
    assert await admit(store, "a1", "alpha", limit=1), "the place is free again"
    assert (await store.readings.load(["alpha"]))["alpha"].done == 1
    assert await contract_redis.get(names.model_done_key("beta")) is None


async def test_the_reaper_frees_a_dead_workers_places_in_each_jobs_model(
    store: Store, contract_redis
) -> None:
    await store.workers.heartbeat(worker_info("dead", models=("alpha", "beta")), ttl_s=30)
    for job_id, model in (("a0", "alpha"), ("b0", "beta")):
        assert await admit(store, job_id, model, limit=1)
        await store.jobs.mark_started(spec(job_id, model), "dead", hold_s=60)
    assert await contract_redis.hgetall(names.worker_jobs_key("dead")) == {
        b"a0": b'["anonymous","alpha","normal"]',
        b"b0": b'["anonymous","beta","normal"]',
    }
    await contract_redis.zadd(names.WORKERS, {"dead": 1})  # its heartbeat expired
    assert await store.workers.reap() == (["dead"], 2, 0)
    assert await store.readings.in_system("alpha") == 0
    assert await store.readings.in_system("beta") == 0


async def test_the_heartbeat_remembers_the_models_served(store: Store, contract_redis) -> None:
    before_ms = int(time.time() * 1000) - 5_000
    await store.workers.heartbeat(worker_info("w1", models=("alpha", "alpha-lora")), ttl_s=30)
    await store.workers.remove_worker("w1")
    assert sorted(await store.readings.models_seen(before_ms)) == ["alpha", "alpha-lora"]
    assert await store.readings.models_seen(int(time.time() * 1000) + 60_000) == []
    await store.workers.forget_models(before_ms)
    assert len(await store.readings.models_seen(0)) == 2, "seen after before_ms: kept"
    await store.workers.forget_models(int(time.time() * 1000) + 60_000)
    assert await store.readings.models_seen(0) == []
    assert await store.readings.live_workers() == []


async def test_an_admission_wakes_only_its_models_workers(store: Store, contract_redis) -> None:
    pubsub = contract_redis.pubsub()
    await pubsub.subscribe(names.WAKE_CHANNEL)
    await pubsub.get_message(timeout=1)
    assert await admit(store, "a0", "alpha")
    msg = await pubsub.get_message(timeout=1)
    assert msg is not None
    assert msg["data"] == b"model:alpha"
    await pubsub.aclose()


async def test_a_pick_whose_job_never_started_goes_back_to_the_queue(
    store: Store, contract_redis
) -> None:
    """A pick claims its jobs for the worker until they start; one that never started (the
    reply was lost) is requeued, once old enough, in its place; a started or running one
    is not (at most once)."""
    for job_id in ("a0", "a1", "a2"):
        assert await admit(store, job_id, "alpha")
    picks = [i for i, _ in await store.routing.pick_jobs(("alpha",), 3, 60, worker_id="w1")]
    assert picks == ["a0", "a1", "a2"]
    assert sorted(await contract_redis.hkeys(names.worker_claims_key("w1"))) == [
        b"a0",
        b"a1",
        b"a2",
    ]
    await store.jobs.mark_started(
        spec("a0", "alpha"), "w1", hold_s=60
    )  # started: no longer a claim
    assert await store.workers.requeue_claims("w1", [], min_age_s=60) == 0, "too young"
    assert await store.workers.requeue_claims("w1", ["a1"], min_age_s=0) == 1, "a1 runs: only a2"
    assert await contract_redis.exists(names.in_progress_key("a2")) == 0
    assert await store.routing.pick_jobs(("alpha",), 3, 60, worker_id="w2") == [
        ("a2", int(await contract_redis.zscore(names.QUEUE, "a2")))
    ], "requeued under its enqueue score, pickable again"
    assert await contract_redis.hkeys(names.worker_claims_key("w1")) == [b"a1"], "a1 runs on"
    await store.jobs.release(spec("a1", "alpha"), "w1", None, p.Outcome.COMPLETED)
    assert await contract_redis.hkeys(names.worker_claims_key("w1")) == []


async def test_a_dead_workers_unstarted_claims_end_like_its_started_jobs(
    store: Store, contract_redis
) -> None:
    """At most once: a claim of a worker that died may have reached its engine, so the
    reaper ends it (worker_lost) rather than running it again."""
    await store.workers.heartbeat(worker_info("dead", models=("alpha",)), ttl_s=30)
    assert await admit(store, "a0", "alpha", limit=1)
    assert [i for i, _ in await store.routing.pick_jobs(("alpha",), 1, 60, worker_id="dead")] == [
        "a0"
    ]
    await contract_redis.zadd(names.WORKERS, {"dead": 1})
    assert await store.workers.reap() == (["dead"], 1, 0)
    assert await store.readings.in_system("alpha") == 0
    assert await contract_redis.exists(names.worker_claims_key("dead")) == 0
