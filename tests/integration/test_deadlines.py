"""Scheduling to service levels on real Redis, gateway and worker processes: time-to-first-
token objectives order a key's waiting jobs (earliest deadline first), an objective that
cannot be met is refused at once, a job whose deadline passes in the queue is dropped and
never reaches the engine; MAX_ACTIVE=auto sizes a worker's slots to a loaded simulator."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from bench.sim_load import curve_ms, parse_curve
from llmq.shared.protocol import ANONYMOUS
from llmq.shared.queue import names
from tests.support.clients import (
    assert_drained,
    body,
    get_json,
    new_key,
    release,
    sim_stats,
    wait_held,
)
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.integration

URL = "/v1/chat/completions"
OBJECTIVE = "X-TTFT-Objective-Ms"
POLICY = "X-Deadline-Policy"


def auth(secret: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **headers}


def tagged(tag: str, **sim: Any) -> dict[str, Any]:
    return body(stream=False, tag=tag, tokens=1, **sim)


def engine_order(sim_url: str) -> list[str]:
    return [t for t in sim_stats(sim_url)["tags"] if t != "blocker"]


def waiting(rdb: redis.Redis) -> int:
    return int(cast(int, rdb.zcard("llmq:queue")))


def queued_now(rdb: redis.Redis, n: int) -> Callable[[], bool]:
    return lambda: waiting(rdb) == n


def metric(gw: Proc, name: str, **labels: str) -> float:
    """A counter's value on the gateway's /metrics (0 when it has no such series)."""
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_keys_interactive_request_admitted_after_its_agent_steps_starts_first(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    """Across two gateways: the key's default objective (20 s) makes its chat request due
    before the agent steps it queued first (28 s, best-effort; without any objective they
    would be due at QUEUE_TIMEOUT_S, 30 s)."""
    stack.worker(max_active=1)
    gws = [stack.gateway(auth="keys") for _ in range(2)]
    app = new_key(stack, "app", "--ttft-objective-ms", "20000")
    agent = auth(app, **{OBJECTIVE: "28000", POLICY: "best-effort"})

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            blocker = asyncio.create_task(
                c.post(gws[0].url + URL, json=tagged("blocker", hold="b"), headers=auth(app))
            )
            await asyncio.to_thread(wait_held, sim.url, "b", 1)
            queued = []
            sends = [
                ("step1", gws[0], agent),
                ("step2", gws[1], agent),
                ("plain", gws[0], auth(app)),
                ("chat", gws[1], auth(app, **{OBJECTIVE: "19000"})),
            ]
            for n, (tag, gw, headers) in enumerate(sends):
                queued.append(
                    asyncio.create_task(c.post(gw.url + URL, json=tagged(tag), headers=headers))
                )
                await asyncio.to_thread(wait_for, queued_now(rdb, n + 2), 10, f"{tag} queued")
            await asyncio.to_thread(release, sim.url, "b")
            for r in [await blocker, *(await asyncio.gather(*queued))]:
                assert r.status_code == 200, r.text

    asyncio.run(run())
    # "plain" takes its key's default (20 s), "chat" its own 19 s: both before the steps,
    # "chat" first (due 19 s after its admission, before "plain"'s 20 s).
    assert engine_order(sim.url) == ["chat", "plain", "step1", "step2"]
    assert_drained(rdb)


def test_a_job_is_passed_only_by_its_keys_jobs_due_before_it(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    """The bound: an agent step (no objective: due at admission + QUEUE_TIMEOUT_S, 8 s) under
    a steady stream of the same key's interactive requests (objective 5 s, best-effort: never
    dropped) is passed by those due before it, all admitted before its due time minus 5 s,
    and by none admitted after: it starts before every one of those."""
    stack.worker(max_active=1)
    gw = stack.gateway(queue_timeout_s=8, queue_max=200)
    interactive = {OBJECTIVE: "5000", POLICY: "best-effort"}

    async def run() -> tuple[float, list[tuple[str, float, float]]]:
        async with httpx.AsyncClient(timeout=60) as c:
            blocker = asyncio.create_task(c.post(gw.url + URL, json=tagged("blocker", hold="b")))
            await asyncio.to_thread(wait_held, sim.url, "b", 1)
            agent = asyncio.create_task(c.post(gw.url + URL, json=tagged("agent")))
            await asyncio.to_thread(wait_for, lambda: waiting(rdb) == 2, 10, "the agent step")
            queue = names.band_queue_key("sim-model", "normal", ANONYMOUS)
            due = float(cast(float, rdb.zscore(queue, _only_waiting(rdb))))
            stream: list[tuple[str, float, float]] = []
            tasks = []
            for n in range(24):  # one every ~0.2 s for ~4.8 s: past due - 5 s (3 s)
                before = time.time()
                tasks.append(
                    asyncio.create_task(
                        c.post(gw.url + URL, json=tagged(f"i{n}"), headers=interactive)
                    )
                )
                await asyncio.to_thread(wait_for, queued_now(rdb, n + 3), 10, f"i{n} queued")
                stream.append((f"i{n}", before, time.time()))
                await asyncio.sleep(0.2)
            await asyncio.to_thread(release, sim.url, "b")
            for r in [await blocker, await agent, *(await asyncio.gather(*tasks))]:
                assert r.status_code == 200, r.text
            return due / 1000, stream

    due_s, stream = asyncio.run(run())
    order = engine_order(sim.url)
    at = order.index("agent")
    for tag, before, after in stream:
        if after + 5 < due_s - 0.2:  # due well before the agent step: it went first
            assert order.index(tag) < at, (tag, order)
        elif before + 5 > due_s + 0.2:  # due well after: it waited behind the step
            assert order.index(tag) > at, (tag, order)
    assert any(before + 5 > due_s + 0.2 for _, before, _ in stream), "the stream went past it"
    assert_drained(rdb)


def _only_waiting(rdb: redis.Redis) -> str:
    ids = [m.decode() for m in cast(list[bytes], rdb.zrange("llmq:queue", 0, -1))]
    queued = [i for i in ids if not rdb.exists(f"{names.IN_PROGRESS_PREFIX}{i}")]
    assert len(queued) == 1, queued
    return queued[0]


def test_an_objective_that_cannot_be_met_is_refused_at_once(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    """Once the model's service time and time to first token are measured, a request whose
    predicted time to first token (its wait behind three queued jobs and a running one, plus
    the first token) exceeds its 50 ms objective is a 429 deadline_unattainable with
    Retry-After, before anything is queued, on either gateway; best-effort is queued anyway
    (and, due first, runs first)."""
    stack.worker(max_active=1)
    gws = [stack.gateway() for _ in range(2)]
    for _ in range(3):  # measured: service time and time to first token of the model
        assert httpx.post(gws[0].url + URL, json=body(stream=True, tokens=16), timeout=30)
    service = cast(dict[bytes, bytes], rdb.hgetall("llmq:model:sim-model:service"))
    assert int(service[b"ms"]) > 0
    assert b"ttft" in service

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            blocker = asyncio.create_task(
                c.post(gws[0].url + URL, json=tagged("blocker", hold="b"))
            )
            await asyncio.to_thread(wait_held, sim.url, "b", 1)
            queued = [
                asyncio.create_task(c.post(gws[0].url + URL, json=tagged(f"q{n}")))
                for n in range(3)
            ]
            await asyncio.to_thread(wait_for, lambda: waiting(rdb) == 4, 10, "three queued")
            for gw in gws:
                refused = await c.post(gw.url + URL, json=tagged("late"), headers={OBJECTIVE: "50"})
                assert refused.status_code == 429
                error = refused.json()["error"]
                assert error["code"] == "deadline_unattainable"
                assert error["type"] == "rate_limit_error"
                assert "50 ms" in error["message"]
                assert int(refused.headers["retry-after"]) >= 1
            assert waiting(rdb) == 4, "nothing was queued for them"
            anyway = asyncio.create_task(
                c.post(gws[1].url + URL, json=tagged("anyway"),
                       headers={OBJECTIVE: "50", POLICY: "best-effort"})
            )  # fmt: skip
            await asyncio.to_thread(wait_for, lambda: waiting(rdb) == 5, 10, "best-effort queued")
            await asyncio.to_thread(release, sim.url, "b")
            for r in [await blocker, *(await asyncio.gather(*queued)), await anyway]:
                assert r.status_code == 200, r.text

    asyncio.run(run())
    # Best-effort still orders by its deadline: due first, it goes first.
    order = engine_order(sim.url)
    assert order[0] == "anyway"
    assert sorted(order[1:]) == ["q0", "q1", "q2"]
    for gw in gws:
        assert metric(gw, "api_deadline_refusals_total", reason="unattainable", band="normal") == 1
        assert metric(gw, "api_ttft_objective_total", result="refused") == 1
        assert metric(gw, "api_rejections_total", reason="deadline_unattainable") == 1
    assert_drained(rdb)


def test_a_queued_job_past_its_deadline_is_dropped_and_never_run(
    stack: Stack, rdb: redis.Redis, sim: Proc, sdk: Any
) -> None:
    """A waiting request whose 1.5 s objective passes is answered 429 deadline_unattainable
    at that moment, and a background response with one ends failed with that error (nobody
    waits for it: the worker's sweep drops it while every slot is busy); neither ever
    reaches the engine. A request that started in time is served whatever follows."""
    stack.worker(max_active=1)
    gw = stack.gateway()
    client = sdk(gw.url)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            blocker = asyncio.create_task(c.post(gw.url + URL, json=tagged("blocker", hold="b")))
            await asyncio.to_thread(wait_held, sim.url, "b", 1)
            t0 = time.monotonic()
            late = await c.post(gw.url + URL, json=tagged("late"), headers={OBJECTIVE: "1500"})
            waited = time.monotonic() - t0
            assert late.status_code == 429, late.text
            assert late.json()["error"]["code"] == "deadline_unattainable"
            assert 1.4 <= waited < 10, waited
            background = await asyncio.to_thread(
                lambda: client.with_options(default_headers={OBJECTIVE: "1000"}).responses.create(
                    model="sim-model", input="x", background=True,
                    extra_body={"sim": {"tag": "background", "tokens": 1}},
                )
            )  # fmt: skip
            assert background.status == "queued"

            def failed() -> bool:
                return bool(client.responses.retrieve(background.id).status == "failed")

            await asyncio.to_thread(wait_for, failed, 15, "the background response failed")
            gone = client.responses.retrieve(background.id)
            assert gone.error is not None
            assert gone.error.code == "deadline_unattainable"
            assert get_json(rdb, f"llmq:outcome:{background.id}")["outcome"] == "deadline"
            await asyncio.to_thread(release, sim.url, "b")
            assert (await blocker).status_code == 200

    asyncio.run(run())
    assert engine_order(sim.url) == []
    assert metric(gw, "api_deadline_refusals_total", reason="expired") == 1
    assert metric(gw, "api_ttft_objective_total", result="dropped") == 1
    assert_drained(rdb)


def test_attainment_counts_what_met_its_objective(stack: Stack, rdb: redis.Redis) -> None:
    stack.worker(max_active=4)
    gw = stack.gateway()
    for _ in range(3):
        ok = httpx.post(gw.url + URL, json=body(tokens=4), headers={OBJECTIVE: "20000"}, timeout=30)
        assert ok.status_code == 200
    assert metric(gw, "api_ttft_objective_total", result="met", band="normal") == 3
    assert metric(gw, "api_ttft_objective_total", result="missed") == 0
    assert rdb.zcard("llmq:model:sim-model:deadlines") == 0, "started: no deadline kept"


# -- MAX_ACTIVE=auto on a loaded simulator -------------------------------------------------

CURVE = "1:5,40:45"  # the time per token grows 1 ms per running stream
TPOT_MS = 25  # met by 20 streams at most (curve_ms(20) = 24.5 ms)


def _load(url: str, streams: int, seconds: float) -> list[float]:
    """``streams`` clients each sending 100-token streams back to back for ``seconds``; the
    time per token of each stream (from its first token to its end)."""

    async def client(c: httpx.AsyncClient, out: list[float], until: float) -> None:
        while time.monotonic() < until:
            first = None
            async with c.stream("POST", url + URL, json=body(tokens=100)) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic()
            if first is not None:
                out.append((time.monotonic() - first) / 99)

    async def run() -> list[float]:
        out: list[float] = []
        until = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=streams)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            await asyncio.gather(*(client(c, out, until) for _ in range(streams)))
        return out

    return asyncio.run(run())


def _limits_during(rdb: redis.Redis, seconds: float, every: float = 0.5) -> list[int]:
    """The worker's advertised slots (its heartbeat), sampled."""
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key in rdb.scan_iter(match="llmq:worker:*"):
            if rdb.type(key) == b"hash":
                value = rdb.hget(key, "max_active")
                if value is not None:
                    seen.append(int(cast(bytes, value)))
        time.sleep(every)
    return seen


@pytest.fixture
def loaded_sim(logdir: Path, request: pytest.FixtureRequest) -> Any:
    """A simulator under load (``bench.sim_load``), its arguments from the test's param."""
    extra = getattr(request, "param", ())
    proc = start_sim(logdir, "--itl-curve", CURVE, "--ttft-ms", "10", *extra)
    yield proc
    proc.kill()


def _auto_stack(stack: Stack, sim: Proc) -> Proc:
    stack.engine_url = sim.url
    stack.worker(max_active="auto", tpot_objective_ms=TPOT_MS, max_active_ceiling=64)
    return stack.gateway(queue_max=100)


def test_auto_slots_settle_near_the_best_fixed_value_within_the_time_per_token(
    stack: Stack, rdb: redis.Redis, loaded_sim: Proc
) -> None:
    """40 clients against a worker with MAX_ACTIVE=auto: its limit settles where the
    simulator's throughput (streams / time per token) is within 10 % of the best fixed
    MAX_ACTIVE that keeps 25 ms per token (20 here), and streams keep the objective."""
    gw = _auto_stack(stack, loaded_sim)
    points = parse_curve(CURVE)
    best = max(n for n in range(1, 65) if curve_ms(points, n) <= TPOT_MS)
    tpots: list[float] = []
    limits: list[int] = []

    def sample() -> None:
        time.sleep(10)  # settling
        limits.extend(_limits_during(rdb, 8))

    async def both() -> None:
        load = asyncio.to_thread(_load, gw.url, 40, 18)
        done, _ = await asyncio.gather(load, asyncio.to_thread(sample))
        tpots.extend(done)

    asyncio.run(both())
    assert limits, "the heartbeat advertised its limit"
    settled = statistics.median(limits)
    ratio = (settled / curve_ms(points, settled)) / (best / curve_ms(points, best))
    assert ratio >= 0.9, (limits, best)
    assert statistics.median(tpots) * 1000 <= TPOT_MS * 1.1, statistics.median(tpots)


@pytest.mark.parametrize("loaded_sim", [("--kv-tokens", "900")], indirect=True)
def test_auto_slots_back_off_when_the_engine_preempts(
    stack: Stack, rdb: redis.Redis, loaded_sim: Proc
) -> None:
    """The same load on an engine whose KV cache holds ~8 whole streams (900 tokens; 110
    each at their end): it preempts beyond that, and the limit backs off well below the 20
    the time per token alone would allow."""
    gw = _auto_stack(stack, loaded_sim)
    limits: list[int] = []

    def sample() -> None:
        time.sleep(10)
        limits.extend(_limits_during(rdb, 8))

    async def both() -> None:
        await asyncio.gather(asyncio.to_thread(_load, gw.url, 40, 18), asyncio.to_thread(sample))

    asyncio.run(both())
    preempted = httpx.get(loaded_sim.url + "/metrics").text
    assert "vllm:num_preemptions_total" in preempted
    assert float(preempted.split("vllm:num_preemptions_total")[1].split()[1]) > 0
    assert limits
    assert statistics.median(limits) <= 14, limits


def test_auto_is_refused_without_a_time_per_token_objective(stack: Stack) -> None:
    proc = stack.worker(max_active="auto")
    wait_for(lambda: not proc.alive(), 30, "the worker to refuse to start")
    assert "MAX_ACTIVE=auto needs TPOT_OBJECTIVE_MS" in proc.output()
