"""Cache-aware pickup (queue.routing's pick) in the Redis contract, on fakeredis and a real
redis-server: a job goes to the worker whose engine holds its prompt's prefix, waits for it
only while that worker has a free slot and at most AFFINITY_MAX_WAIT_MS, and never before
what bands and per-key fairness put first; workers' records are bounded and leave with them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from llmq.shared import protocol as p
from llmq.shared.prefix import signature
from llmq.shared.queue import names
from llmq.shared.queue.routing import Affinity, PickResult
from llmq.shared.queue.store import Store
from tests.support.records import job_spec, worker_info

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
_clock = itertools.count(int(time.time() * 1000))
LONG = Affinity(max_wait_ms=60_000)  # a left job stays left for the whole test


def turns(name: str, n: int, system: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Conversation ``name`` up to its ``n``-th user turn, after its own system prompt (or
    ``system``)."""
    messages = [system or {"role": "system", "content": f"You are {name}'s assistant."}]
    for i in range(n):
        if i:
            messages.append({"role": "assistant", "content": f"{name} answer {i}"})
        messages.append({"role": "user", "content": f"{name} question {i}"})
    return messages


async def admit(store: Store, job_id: str, messages: list[Any], **spec: Any) -> p.JobSpec:
    body = {"model": "m", "messages": messages}
    s = job_spec(job_id, body=body, enqueued_at_ms=next(_clock), **spec)
    result = await store.jobs.admit(
        s, limit=100, hold_s=30, expire_s=30, prefix=signature(body, "m")
    )
    assert result.admitted
    return s


async def live(store: Store, *workers: str, slots: int = 4) -> None:
    for w in workers:
        await store.workers.heartbeat(worker_info(w, max_active=slots), ttl_s=30)


async def pick(store: Store, worker: str, limit: int = 4, terms: Affinity = LONG) -> PickResult:
    return await store.routing.pick(("m",), limit, 60, worker, terms)


def ids(result: PickResult) -> list[str]:
    return [j.id for j in result.jobs]


async def test_a_conversations_next_turn_goes_to_the_worker_that_served_it(store: Store) -> None:
    """w1 served turn 1 (cold). Turn 2 is left by w2 (w1 has a free slot): w2 takes nothing
    and is told when to look again; w1 takes it, a hit on every block of turn 1."""
    await live(store, "w1", "w2")
    await admit(store, "t1", turns("x", 1))
    first = await pick(store, "w1")
    assert [(j.id, j.affinity, j.left_ms) for j in first.jobs] == [("t1", "cold", -1)]
    await admit(store, "t2", turns("x", 2))
    other = await pick(store, "w2")
    assert other.jobs == []
    assert 0 < other.retry_ms <= LONG.max_wait_ms
    warm = await pick(store, "w1")
    [job] = warm.jobs
    depth = len(signature({"messages": turns("x", 1)}, "m"))
    assert (job.id, job.held, job.best, job.affinity) == ("t2", depth, depth, "hit")
    assert job.left_ms >= 0, "it was left once"
    assert not await store.redis.exists(names.prefix_key("t2")), "its signature goes at pickup"


async def test_a_left_job_is_taken_by_anyone_once_its_wait_runs_out(store: Store) -> None:
    await live(store, "w1", "w2")
    await admit(store, "t1", turns("x", 1))
    assert ids(await pick(store, "w1")) == ["t1"]
    await admit(store, "t2", turns("x", 2))
    short = Affinity(max_wait_ms=200)
    started = time.monotonic()
    assert ids(await pick(store, "w2", terms=short)) == []
    deadline = started + 10
    while not (taken := await pick(store, "w2", terms=short)).jobs:
        assert time.monotonic() < deadline, "never taken"
        await asyncio.sleep(0.02)
    assert time.monotonic() - started >= 0.2, "not before AFFINITY_MAX_WAIT_MS"
    [job] = taken.jobs
    assert (job.id, job.affinity) == ("t2", "miss")
    assert job.left_ms >= 200


async def test_a_warm_worker_without_a_free_slot_is_not_waited_for(store: Store) -> None:
    await live(store, "w1", slots=1)
    await live(store, "w2")
    await admit(store, "t1", turns("x", 1))
    assert ids(await pick(store, "w1", limit=1)) == ["t1"]  # w1's one slot: busy
    await admit(store, "t2", turns("x", 2))
    [job] = (await pick(store, "w2")).jobs
    assert (job.id, job.affinity, job.left_ms) == ("t2", "miss", -1)


async def test_a_worker_takes_its_warm_job_before_an_older_one_for_at_most_the_wait(
    store: Store,
) -> None:
    """Waiting, oldest first: c (cold) then x2 (warm on w1): w1's one slot takes x2, and c,
    passed over, is taken next (by w2). Then w1 alone: d (cold) is passed over for x3, but
    once d has been passed over for AFFINITY_MAX_WAIT_MS, w1 takes d before the warm x4."""
    await live(store, "w1", "w2")
    await admit(store, "x1", turns("x", 1))
    assert ids(await pick(store, "w1", limit=1)) == ["x1"]
    await admit(store, "c", turns("c", 1))
    await admit(store, "x2", turns("x", 2))
    chosen = await pick(store, "w1", limit=1)
    assert ids(chosen) == ["x2"]
    assert chosen.retry_ms > 0, "c's wait started: w1 looks again when it runs out"
    [job] = (await pick(store, "w2", limit=1)).jobs
    assert (job.id, job.affinity) == ("c", "cold")
    assert job.left_ms >= 0

    await store.workers.remove_worker("w2")  # now w1 is the only worker
    short = Affinity(max_wait_ms=200)
    await admit(store, "d", turns("d", 1))
    await admit(store, "x3", turns("x", 3))
    chosen = await pick(store, "w1", limit=1, terms=short)
    assert ids(chosen) == ["x3"]
    # The pick says when d's wait runs out (ms after its own clock reading): once that
    # much time has passed here, Redis' clock has passed it too. No guessed duration.
    assert 0 < chosen.retry_ms <= 200
    await admit(store, "x4", turns("x", 4))
    await asyncio.sleep(chosen.retry_ms / 1000 + 0.001)
    [job] = (await pick(store, "w1", limit=1, terms=short)).jobs
    assert job.id == "d", "its wait ran out: it goes before the warm x4"
    assert job.left_ms >= 200


async def test_bands_and_keys_decide_before_affinity(store: Store) -> None:
    """Key a's only job is warm on w1 (free): w2 leaves it and serves key b's instead. A cold
    high-band job goes before a warm normal-band one."""
    await live(store, "w1", "w2")
    await admit(store, "a1", turns("a", 1), tenant="a")
    assert ids(await pick(store, "w1", limit=1)) == ["a1"]
    await admit(store, "a2", turns("a", 2), tenant="a")
    await admit(store, "b1", turns("b", 1), tenant="b")
    assert ids(await pick(store, "w2", limit=4)) == ["b1"], "a2 left for w1, then key b"
    await admit(store, "h", turns("h", 1), tenant="c", band=p.Band.HIGH)
    assert ids(await pick(store, "w1", limit=1)) == ["h"], "the high band first"
    assert ids(await pick(store, "w1", limit=1)) == ["a2"]


async def test_a_shared_system_prompt_counts_until_every_worker_holds_it(store: Store) -> None:
    """w1 (2 slots) served one conversation under the shared system prompt: a new one under
    it is left to w1 (its first block is there). With w1 full, the next goes to w2, which
    then holds it too: once both hold it, a tie, nothing is left."""
    await live(store, "w1", slots=2)
    await live(store, "w2")
    await admit(store, "a1", turns("a", 1, SYSTEM))
    assert ids(await pick(store, "w1")) == ["a1"]
    await admit(store, "b1", turns("b", 1, SYSTEM))
    assert ids(await pick(store, "w2")) == []
    [job] = (await pick(store, "w1")).jobs
    assert (job.id, job.held, job.affinity) == ("b1", 1, "hit")
    await admit(store, "c1", turns("c", 1, SYSTEM))
    [job] = (await pick(store, "w2")).jobs
    assert (job.id, job.held, job.best, job.affinity) == ("c1", 0, 1, "miss"), "w1 is full"
    await store.redis.delete(names.worker_claims_key("w1"))  # w1's jobs ended: free again
    await admit(store, "d1", turns("d", 1, SYSTEM))
    [job] = (await pick(store, "w2")).jobs
    assert (job.id, job.held, job.best, job.left_ms) == ("d1", 1, 1, -1), "a tie is not left"


async def test_without_affinity_the_oldest_goes_first(store: Store) -> None:
    await live(store, "w1", "w2")
    await admit(store, "t1", turns("x", 1))
    assert ids(await pick(store, "w1")) == ["t1"]
    await admit(store, "t2", turns("x", 2))
    plain = await store.routing.pick(("m",), 4, 60, "w2")  # PREFIX_AFFINITY off
    assert [(j.id, j.affinity) for j in plain.jobs] == [("t2", "cold")]
    assert plain.retry_ms == -1


async def test_a_workers_record_is_bounded_and_leaves_with_it(store: Store) -> None:
    await live(store, "w1", "w2")
    small = Affinity(max_wait_ms=60_000, record_max=16)
    for i in range(6):
        await admit(store, f"j{i}", turns(f"conv{i}", 3))  # 5 messages: 6 blocks each
        assert len(ids(await pick(store, "w1", terms=small))) == 1
    record = names.worker_prefixes_key("w1")
    assert await store.redis.zcard(record) == 16
    assert 0 < await store.redis.pttl(record) <= small.ttl_s * 1000
    await store.workers.remove_worker("w1")  # it drains: gone
    assert not await store.redis.exists(record)


async def test_a_dead_workers_record_is_dropped_and_its_jobs_go_elsewhere(
    store: Store, contract_redis: Any
) -> None:
    await live(store, "w1", "w2")
    await admit(store, "t1", turns("x", 1))
    assert ids(await pick(store, "w1")) == ["t1"]
    await admit(store, "t2", turns("x", 2))
    await contract_redis.zadd(names.WORKERS, {"w1": 1})  # its heartbeat expired
    [job] = (await pick(store, "w2")).jobs
    assert (job.id, job.affinity) == ("t2", "cold"), "a dead worker holds nothing"
    dead, _, _ = await store.workers.reap()
    assert dead == ["w1"]
    assert not await contract_redis.exists(names.worker_prefixes_key("w1"))


async def test_a_cancelled_jobs_signature_goes_with_it(store: Store) -> None:
    s = await admit(store, "t1", turns("x", 1))
    assert await store.redis.exists(names.prefix_key("t1"))
    assert await store.jobs.cancel(s)
    assert not await store.redis.exists(names.prefix_key("t1"))
