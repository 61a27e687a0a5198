"""In-flight migration on real processes: streams whose worker is SIGKILLed, whose engine
process is killed under a live worker, or whose worker drains past DRAIN_TIMEOUT_S go on
on another worker, from the next token: the text an undisturbed run gives (the simulator is
deterministic), no error, no delta twice or missing, event ids continuous, usage exact.
The engine that took over gets each partial answer as a final assistant message to
continue. A job that moved MIGRATE_MAX times ends with ``worker_lost``."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import (
    Frames,
    assert_drained,
    body,
    read_frames,
    release,
    sim_stats,
    wait_held,
)
from tests.support.stack import Proc, Stack, free_port, start_sim, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

TOKENS, CUT_AT = 30, 10  # each answer's tokens; the first engine holds them after CUT_AT
STREAMS = 8
WHOLE = "".join(f"tok{i} " for i in range(TOKENS))
# Generous for a loaded 2-core machine: the hand-over waits for the dead worker's heartbeat
# to expire (3 s here); bench.migrate reports the real pause.
WITHIN_S = 60


@pytest.fixture
def other(logdir: Path) -> Iterator[Proc]:
    """The engine of the worker that takes over."""
    proc = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5")
    release(proc.url, "m")  # its continuations pass the hold (kept for later holds)
    yield proc
    proc.kill()


def request(i: int, **extra: Any) -> dict[str, Any]:
    return {
        **body(tokens=TOKENS, hold="m", hold_after=CUT_AT, record=f"r{i}"),
        "stream_options": {"include_usage": True},
        **extra,
    }


def usage_of(frames: Frames) -> dict[str, Any]:
    return next(c["usage"] for c in reversed(frames.chunks) if c.get("usage"))


def check_whole(frames: Frames, expected_usage: dict[str, Any]) -> None:
    """The answer an undisturbed run gives, its events numbered without a gap."""
    assert frames.status == 200
    assert frames.done
    assert not [c for c in frames.chunks if "error" in c], frames.chunks
    assert frames.text == WHOLE
    assert frames.ids == list(range(frames.ids[0], frames.ids[0] + len(frames.ids)))
    assert frames.ids[0] == 2  # (#1 is STARTED, not relayed)
    usage = usage_of(frames)
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[k] == expected_usage[k], (usage, expected_usage)
    roles = [c for c in frames.chunks for ch in c.get("choices") or [] if "role" in ch["delta"]]
    assert len(roles) == 1, "the role once, in the first delta"


def undisturbed(gw: Proc) -> dict[str, Any]:
    """The usage of the same request never cut (the hold released first)."""

    async def run() -> Frames:
        async with httpx.AsyncClient(timeout=60) as c:
            return await read_frames(
                c, "POST", gw.url + "/v1/chat/completions", json=request(99, sim={
                    "tokens": TOKENS, "record": "undisturbed"})
            )  # fmt: skip

    frames = asyncio.run(run())
    assert frames.text == WHOLE
    return usage_of(frames)


def check_continued(other: Proc, n: int) -> None:
    """The engine that took over got each partial answer as a final assistant message."""
    recorded = sim_stats(other.url)["recorded"]
    for i in range(n):
        got = recorded[f"r{i}"]
        assert got["continue_final_message"] is True
        assert got["add_generation_prompt"] is False
        assert got["messages"][-1] == {
            "role": "assistant",
            "content": "".join(f"tok{t} " for t in range(CUT_AT)),
        }
        assert got["messages"][:-1] == body()["messages"]


def worker_metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_nothing_left(rdb: redis.Redis) -> None:
    assert_drained(rdb, within=15)
    assert rdb.keys("llmq:log:*") == [], "no progress log outlives its job"
    assert rdb.keys("llmq:moves:*") == []
    assert rdb.keys("arq:in-progress:*") == []


def run_cut(
    gw: Proc,
    sim: Proc,
    n: int,
    cut: Callable[[], None],
    bodies: Callable[[int], dict[str, Any]] = request,
) -> list[Frames]:
    """``n`` streams held on ``sim`` after CUT_AT tokens, then ``cut()``; their answers."""

    async def run() -> list[Frames]:
        async with httpx.AsyncClient(timeout=120) as c:
            streams = [
                asyncio.create_task(
                    read_frames(c, "POST", gw.url + "/v1/chat/completions", json=bodies(i))
                )
                for i in range(n)
            ]
            await asyncio.to_thread(wait_held, sim.url, "m", n, 30)
            await asyncio.to_thread(cut)
            return list(await asyncio.wait_for(asyncio.gather(*streams), WITHIN_S))

    return asyncio.run(run())


def ready_slots(gw: Proc) -> int:
    return int(httpx.get(gw.url + "/health").json()["models"].get("sim-model", 0))


def after_a_second_worker(
    stack: Stack,
    gw: Proc,
    engine: Proc,
    failure: Callable[[], None],
    slots: int = STREAMS,
    **settings: object,
) -> Callable[[], None]:
    """The cut: a second worker (on ``engine``, as many slots as the first) joins and is
    ready, then ``failure`` strikes the first."""

    def cut() -> None:
        stack.worker(vllm_url=engine.url, max_active=slots, **settings)
        wait_for(lambda: ready_slots(gw) == 2 * slots, 30, "the second worker")
        failure()

    return cut


def test_streams_of_a_killed_worker_continue_on_another(
    stack: Stack, rdb: redis.Redis, sim: Proc, other: Proc
) -> None:
    victim = stack.worker(max_active=STREAMS)
    gw = stack.gateway()
    expected = undisturbed(gw)
    port = free_port()
    kill = after_a_second_worker(
        stack, gw, other, lambda: victim.signal(signal.SIGKILL), worker_metrics_port=port
    )
    results = run_cut(gw, sim, STREAMS, kill)
    for frames in results:
        check_whole(frames, expected)
    check_continued(other, STREAMS)
    assert worker_metric(port, 'worker_jobs_migrated_total{reason="worker_lost"}') == STREAMS
    assert worker_metric(port, 'worker_migration_tokens_total{kind="reprefilled"}') > 0
    assert_nothing_left(rdb)


def test_streams_continue_when_the_engine_dies_under_a_live_worker(
    stack: Stack, rdb: redis.Redis, other: Proc, logdir: Path
) -> None:
    own = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5")
    try:
        worker = stack.worker(vllm_url=own.url, max_active=STREAMS)
        gw = stack.gateway()
        expected = undisturbed(gw)

        results = run_cut(gw, own, STREAMS, after_a_second_worker(stack, gw, other, own.kill))
    finally:
        own.kill()
    for frames in results:
        check_whole(frames, expected)
    check_continued(other, STREAMS)
    assert worker.alive(), "the worker lives on, not ready until its engine answers"
    wait_for(lambda: ready_slots(gw) == STREAMS, 30, "the engineless worker to be not ready")
    assert_nothing_left(rdb)


def test_a_worker_drained_past_its_limit_hands_its_streams_over(
    stack: Stack, rdb: redis.Redis, sim: Proc, other: Proc
) -> None:
    draining = stack.worker(max_active=STREAMS, drain_timeout_s=1)
    gw = stack.gateway()
    expected = undisturbed(gw)

    drain = after_a_second_worker(stack, gw, other, lambda: draining.signal(signal.SIGTERM))
    results = run_cut(gw, sim, STREAMS, drain)
    for frames in results:
        check_whole(frames, expected)
    check_continued(other, STREAMS)
    wait_for(lambda: not draining.alive(), 30, "the drained worker to exit")
    assert "handed over to another worker (drain)" in draining.output()
    assert_nothing_left(rdb)


def test_a_job_that_moved_migrate_max_times_ends_worker_lost(
    stack: Stack, rdb: redis.Redis, sim: Proc, logdir: Path
) -> None:
    second = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5")  # it holds too
    try:
        first = stack.worker(migrate_max=1, max_active=1)
        gw = stack.gateway(migrate_max=1)

        kill_first = after_a_second_worker(
            stack, gw, second, lambda: first.signal(signal.SIGKILL), slots=1, migrate_max=1
        )

        async def run() -> Frames:
            async with httpx.AsyncClient(timeout=120) as c:
                task = asyncio.create_task(
                    read_frames(c, "POST", gw.url + "/v1/chat/completions", json=request(0))
                )
                await asyncio.to_thread(wait_held, sim.url, "m", 1, 30)
                await asyncio.to_thread(kill_first)
                # continued on the second engine, held there at the same token
                await asyncio.to_thread(wait_held, second.url, "m", 1, WITHIN_S)
                stack.worker(vllm_url=sim.url, migrate_max=1, max_active=1)  # it could go here
                wait_for(lambda: ready_slots(gw) == 2, 30, "a third worker")
                stack.procs[-2].signal(signal.SIGKILL)  # the second worker
                return await asyncio.wait_for(task, WITHIN_S)

        frames = asyncio.run(run())
    finally:
        second.kill()
    errors = [c["error"]["code"] for c in frames.chunks if "error" in c]
    assert errors == ["worker_lost"]
    assert frames.text == "".join(f"tok{i} " for i in range(CUT_AT))
    assert frames.done
    assert_nothing_left(rdb)


def test_a_stored_completion_migrated_reads_whole_and_resumes(
    stack: Stack, rdb: redis.Redis, sim: Proc, other: Proc
) -> None:
    victim = stack.worker(max_active=1)
    gw = stack.gateway()
    expected = undisturbed(gw)

    kill = after_a_second_worker(stack, gw, other, lambda: victim.signal(signal.SIGKILL), slots=1)
    (frames,) = run_cut(gw, sim, 1, kill, lambda i: request(i, store=True))
    check_whole(frames, expected)
    job_id = frames.chunks[0]["id"]
    url = f"{gw.url}/v1/chat/completions/{job_id}"
    got = httpx.get(url, timeout=30).json()
    assert got["status"] == "completed"
    assert got["choices"][0]["message"]["content"] == WHOLE
    assert got["usage"]["completion_tokens"] == expected["completion_tokens"]

    async def resume(after: int) -> Frames:
        async with httpx.AsyncClient(timeout=60) as c:
            return await read_frames(
                c, "GET", url, params={"stream": "true"}, headers={"Last-Event-ID": str(after)}
            )

    again = asyncio.run(resume(CUT_AT))  # from the middle of the first worker's part
    assert again.ids[0] == CUT_AT + 1
    assert again.ids == list(range(CUT_AT + 1, CUT_AT + 1 + len(again.ids)))
    assert frames.text.endswith(again.text)
    assert again.text == "".join(f"tok{i} " for i in range(CUT_AT - 1, TOKENS))
    assert json.dumps(got).count("tok29") == 1


def test_an_engine_that_stalls_or_fails_hands_its_streams_over(
    stack: Stack, rdb: redis.Redis, sim: Proc, other: Proc
) -> None:
    """ENGINE_STALL_S: streams with no token for that long go to another worker; an engine
    whose stream breaks while its /health fails (a dead engine core) does the same."""
    # The stall (ENGINE_STALL_S after the held token) must come after the second worker is
    # up, or the streams have nowhere to go: long enough for a worker's start on a loaded
    # machine.
    stalled = stack.worker(max_active=4, engine_stall_s=10)
    gw = stack.gateway()
    expected = undisturbed(gw)

    def nothing() -> None:
        """(The stall comes by itself: the held streams send nothing.)"""

    second_worker = after_a_second_worker(stack, gw, other, nothing, slots=4)
    for frames in run_cut(gw, sim, 2, second_worker):  # held: nothing comes for 10 s
        check_whole(frames, expected)
    assert "engine stalled" in stalled.output()
    # Its engine answers /health: ready again, and it takes jobs again.
    wait_for(lambda: ready_slots(gw) == 8, 30, "the stalled worker to be ready again")
    stack.procs[-1].signal(signal.SIGKILL)  # (the second worker: the next jobs come here)
    wait_for(lambda: ready_slots(gw) == 4, 30, "only the first worker")
    httpx.post(other.url + "/sim/reset")
    release(other.url, "m")

    def engine_dies() -> None:
        second_worker()
        httpx.post(sim.url + "/sim/sick").raise_for_status()  # 500s, and /health fails
        httpx.post(sim.url + "/sim/fail/m").raise_for_status()  # its streams break off

    bodies = [request(i) for i in range(2)]
    for frames in run_cut(gw, sim, 2, engine_dies, lambda i: bodies[i]):
        check_whole(frames, expected)
    check_continued(other, 2)
    wait_for(lambda: ready_slots(gw) == 4, 30, "the failed engine's worker not ready")
    httpx.post(sim.url + "/sim/well").raise_for_status()
    wait_for(lambda: ready_slots(gw) == 8, 30, "ready again once /health answers")
    assert_nothing_left(rdb)
