"""Where a job stands (``queue.standing``'s Lua, run by admission and the position reading)
in the Redis contract (fakeredis and a real redis-server): fair-queuing positions and ETAs,
predictive refusal, Retry-After, and a fair share of places when the queue is full."""

from __future__ import annotations

import json

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.jobs import AdmitStatus, QueueTerms
from llmq.shared.queue.store import Store
from tests.support.records import job_spec

HIGH, NORMAL = p.Band.HIGH, p.Band.NORMAL


def spec(job_id: str, tenant: str = "a", band: p.Band = NORMAL) -> p.JobSpec:
    return job_spec(job_id, tenant=tenant, band=band)


async def service_time(store: Store, ms: int) -> None:
    """What the workers would have measured: the model's jobs take ``ms``."""
    await store.redis.hset(names.model_service_key("m"), "ms", str(ms))  # type: ignore[misc]


async def admit(store: Store, s: p.JobSpec, limit: int = 100, **terms: object):
    return await store.jobs.admit(s, limit=limit, hold_s=30, expire_s=30, queue=QueueTerms(**terms))  # type: ignore[arg-type]


async def test_positions_follow_bands_then_keys_in_turn(store: Store) -> None:
    """Waiting: a0 a1 a2 (key a), b0 (key b), normal band; h0 high. A key's k-th job goes
    after the high band, its own k-1, and up to k of each other key: b0 is 3rd (h0, a0),
    a2 is 5th (h0, a0, a1, b0); the ETA is position x service time / slots."""
    await service_time(store, 1000)
    for s in (spec("r0", tenant="z"), spec("r1", tenant="z")):  # both slots busy
        assert (await admit(store, s)).admitted
    assert len(await store.routing.pick_jobs(("m",), 2, in_progress_s=60)) == 2
    for s in (spec("a0"), spec("a1"), spec("a2"), spec("b0", tenant="b")):
        assert (await admit(store, s)).admitted
    high = await admit(store, spec("h0", tenant="c", band=HIGH), capacity=2)
    assert (high.position, high.eta_ms) == (1, 500), "first in line; 2 slots, 1 s jobs"
    read = store.readings.position
    assert await read(spec("h0", tenant="c", band=HIGH), 2) == (1, 500)
    assert await read(spec("b0", tenant="b"), 2) == (3, 1500)
    assert await read(spec("a2"), 2) == (5, 2500)
    assert await read(spec("a0"), 0) == (3, -1), "ties count the other key first; no slot: no ETA"
    assert await read(spec("gone"), 2) == (0, -1)


async def test_a_job_that_would_wait_too_long_is_refused_with_when_it_would_fit(
    store: Store,
) -> None:
    """One slot, busy; service time unknown: the next job is admitted (it waits). Then with
    3 s jobs and a 2 s timeout, the one after would wait 6 s and is refused (WAIT), told to
    come back in 4 s (when its wait would be 2 s)."""
    first = await admit(store, spec("j0"), capacity=1, timeout_s=2)
    assert first.admitted
    assert len(await store.routing.pick_jobs(("m",), 1, in_progress_s=60)) == 1  # it runs
    assert (await admit(store, spec("j1"), capacity=1, timeout_s=2)).admitted, "no history"
    await service_time(store, 3000)
    late = await admit(store, spec("j2"), capacity=1, timeout_s=2)
    assert late.status == AdmitStatus.WAIT
    assert late.eta_ms == 6000, "second in line (behind j1), one busy slot of 3 s jobs"
    assert late.retry_after_ms == late.eta_ms - 2000


async def test_a_full_bound_says_when_a_place_frees(store: Store) -> None:
    await service_time(store, 4000)
    for i in range(2):
        assert (await admit(store, spec(f"r{i}"), limit=2)).admitted
    assert len(await store.routing.pick_jobs(("m",), 2, in_progress_s=60)) == 2  # both run
    full = await admit(store, spec("r2"), limit=2)
    assert full.status == AdmitStatus.FULL
    assert full.retry_after_ms == 2000, "one of two running 4 s jobs ends every 2 s"


async def test_a_full_queue_gives_the_most_queued_keys_newest_place(store: Store) -> None:
    """limit 3, key a holds all three (waiting): key b is admitted in a2's place (the
    newest of the key with the most); a2's waiter is told queue_full and its stored record
    fails. Key a itself, or one holding as many minus one, is refused as before."""
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(names.events_channel("a2"))
    for i in range(3):
        assert (await admit(store, spec(f"a{i}"), limit=3, displace=True)).admitted
    assert (await admit(store, spec("a3"), limit=3, displace=True)).status == AdmitStatus.FULL
    assert (await admit(store, spec("b0", tenant="b"), limit=3)).status == AdmitStatus.FULL
    took = await admit(store, spec("b0", tenant="b"), limit=3, displace=True)
    assert took.admitted
    assert took.displaced == "a2"
    assert await store.redis.zscore(names.model_admitted_key("m"), "a2") is None
    assert await store.redis.exists(names.job_key("a2")) == 0
    outcome = json.loads(await store.redis.get(names.outcome_key("a2")))
    assert outcome["outcome"] == p.Outcome.DISPLACED
    msg = None
    while msg is None or msg["type"] != "message":
        msg = await pubsub.get_message(timeout=1)
    (event,) = p.Event.decode_message(msg["data"])
    assert json.loads(event.data)["code"] == "queue_full"
    await pubsub.aclose()
    # b holds 1, a 2: b's second request would leave b ahead of a: refused.
    second = await admit(store, spec("b1", tenant="b"), limit=3, displace=True)
    assert second.status == AdmitStatus.FULL
