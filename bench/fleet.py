"""A fleet on loopback: two models, two workers each, two gateways, mixed load.

    python -m bench.fleet [--slots 32] [--seconds 20] [--batch-lines 400] [--out PNG]

Starts redis-server, one simulator per model (``alpha``, ``beta``; TTFT 20 ms, ITL 5 ms,
16 tokens), two workers per model with ``--slots`` slots each and two gateways with API
keys. Three phases:

1. Mixed interactive load for ``--seconds``, through both gateways: on alpha, key "heavy"
   keeps 1.5x alpha's slots of streams in flight and key "light" 4 (alpha is saturated and
   queues); on beta, key "light" keeps half of beta's slots busy. Per model: requests/s,
   TTFT and latency p50/p99, errors; per key on alpha: TTFT p50 (fair queuing within a
   model: light is not stuck behind heavy's backlog); requests each engine got for a model
   it does not serve (cross-routed: must be 0).
2. A batch of ``--batch-lines`` alpha requests of ~1 s each (``--batch-ms``) on alpha's idle
   slots: makespan against the ideal (every slot busy: ceil(lines / slots) rounds), and the
   share of slots busy while lines remain for each (sampled from the engine every 50 ms).
3. The same batch again while key "light" sends one interactive alpha request at a time:
   its wait for a slot (TTFT beyond the engine's own), against one batch job's duration.

Prints the figures and writes a plot (slots busy over time in phases 2 and 3, and the
interactive TTFTs) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from redis.asyncio import Redis

from bench.loadgen import RunResult, Sample, one
from bench.processes import (
    ROOT,
    Proc,
    service_env,
    start_gateway,
    start_redis,
    start_sim,
    start_worker,
)
from llmq.shared.protocol import KeyLimits
from llmq.shared.queue.apikeys import KeyStore

MODELS = ("alpha", "beta")


def chat(model: str, **sim: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "Say something."}],
    }
    if sim:
        body["sim"] = sim
    return body


@dataclass
class Fleet:
    redis: Proc
    sims: dict[str, Proc]
    gateways: list[Proc]
    keys: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)


async def _keys(redis_url: str) -> dict[str, str]:
    redis = Redis.from_url(redis_url)
    try:
        store = KeyStore(redis)
        return {name: (await store.create(name, KeyLimits()))[1] for name in ("heavy", "light")}
    finally:
        await redis.aclose()


def start_fleet(logdir: Path, slots: int) -> Fleet:
    procs: list[Proc] = []
    redis = start_redis(logdir)
    procs.append(redis)
    redis_url = f"redis://127.0.0.1:{redis.port}/0"
    sims = {}
    for model in MODELS:
        sims[model] = start_sim(
            logdir, "--model", model, "--ttft-ms", "20", "--itl-ms", "5", "--tokens", "16"
        )
        procs.append(sims[model])
    common = {"auth": "keys", "max_active": slots, "queue_max": 100_000, "log_level": "WARNING"}
    for model in MODELS:
        for _ in range(2):
            procs.append(start_worker(logdir, service_env(redis_url, sims[model].url, **common)))
    gateways = [
        start_gateway(logdir, service_env(redis_url, sims["alpha"].url, **common)) for _ in range(2)
    ]
    procs += gateways
    fleet = Fleet(redis, sims, gateways, procs=procs)
    fleet.keys = asyncio.run(_keys(redis_url))
    return fleet


def wait_capacity(fleet: Fleet, slots: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        data = httpx.get(fleet.gateways[0].url + "/health").json()
        if data.get("ready_workers") == 4:
            return
        time.sleep(0.2)
    raise TimeoutError("the four workers did not become ready")


def sim_stats(sim: Proc) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(sim.url + "/sim/stats").json()
    return out


async def interactive(fleet: Fleet, slots: int, seconds: float) -> dict[str, RunResult]:
    """Phase 1: lanes keep requests in flight until ``seconds`` pass."""
    lanes = {("alpha", "heavy"): int(slots * 2 * 1.5), ("alpha", "light"): 4,
             ("beta", "light"): slots}  # fmt: skip
    results: dict[str, list[Sample]] = {f"{m}/{k}": [] for m, k in lanes}
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    clients = {
        key: httpx.AsyncClient(
            timeout=120, limits=limits, headers={"Authorization": f"Bearer {secret}"}
        )
        for key, secret in fleet.keys.items()
    }

    async def lane(i: int, model: str, key: str) -> None:
        url = fleet.gateways[i % 2].url
        while time.monotonic() < stop:
            results[f"{model}/{key}"].append(await one(clients[key], url, chat(model)))

    t0 = time.perf_counter()
    await asyncio.gather(*(lane(i, m, k) for (m, k), n in lanes.items() for i in range(n)))
    wall = time.perf_counter() - t0
    for c in clients.values():
        await c.aclose()
    return {name: RunResult(samples, wall) for name, samples in results.items()}


def _batch_lines(n: int, ms: int) -> bytes:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                  "sim": {"ttft_ms": ms, "tokens": 1}}}
        for i in range(n)
    ]  # fmt: skip
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


@dataclass
class BatchRun:
    makespan_s: float
    busy_share: float  # slots busy while lines remained for every slot
    timeline: list[tuple[float, int]]  # (s since creation, engine requests running)
    probe_waits_s: list[float] = field(default_factory=list)


async def batch(fleet: Fleet, lines: int, ms: int, slots: int, probe: bool) -> BatchRun:
    """Phases 2 and 3: one alpha batch on idle slots (with interactive probes)."""
    client = openai.AsyncOpenAI(
        base_url=fleet.gateways[0].url + "/v1", api_key=fleet.keys["heavy"], max_retries=0
    )
    upload = await client.files.create(
        file=("in.jsonl", io.BytesIO(_batch_lines(lines, ms))), purpose="batch"
    )
    sim = fleet.sims["alpha"]
    timeline: list[tuple[float, int]] = []
    waits: list[float] = []
    t0 = time.perf_counter()
    created = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = asyncio.Event()

    async def probes() -> None:
        headers = {"Authorization": f"Bearer {fleet.keys['light']}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as c:
            await asyncio.sleep(1.0)
            while not done.is_set():
                s = await one(c, fleet.gateways[1].url, chat("alpha", tokens=1, ttft_ms=20))
                if s.ok:
                    waits.append(max(0.0, s.ttft_s - 0.020))
                await asyncio.sleep(0.2)

    prober = asyncio.create_task(probes()) if probe else None
    async with httpx.AsyncClient(timeout=10) as c:
        while True:
            running = int((await c.get(sim.url + "/sim/stats")).json()["running"])
            timeline.append((time.perf_counter() - t0, running))
            rec = await client.batches.retrieve(created.id)
            if rec.status in ("completed", "failed", "expired", "cancelled"):
                break
            await asyncio.sleep(0.05)
    makespan = time.perf_counter() - t0
    done.set()
    if prober:
        await prober
    await client.close()
    total_slots = 2 * slots
    full_until = makespan - ms / 1000 * 1.5  # while lines remained for every slot
    busy = [r for t, r in timeline if 1.0 < t < full_until]
    share = sum(min(r, total_slots) for r in busy) / (len(busy) * total_slots) if busy else 0.0
    return BatchRun(makespan, share, timeline, waits)


def plot(runs: list[tuple[str, BatchRun]], slots: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs:
        left.plot([t for t, _ in run.timeline], [r for _, r in run.timeline], label=name)
    left.axhline(2 * slots, color="grey", linestyle="--", label="alpha's slots")
    left.set(xlabel="s since the batch was created", ylabel="engine requests running",
             title="Batch on idle slots")  # fmt: skip
    left.legend()
    waits = [w * 1000 for _, run in runs for w in run.probe_waits_s]
    right.hist(waits, bins=20)
    right.set(xlabel="ms", ylabel="requests", title="Interactive wait for a slot during a batch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def report(phase1: dict[str, RunResult], cross: int) -> None:
    print("\nPhase 1: mixed interactive load (both gateways)")
    print(f"{'model/key':<14}{'req/s':>8}{'ttft p50':>10}{'ttft p99':>10}{'lat p50':>10}"
          f"{'lat p99':>10}{'errors':>8}")  # fmt: skip
    for name, r in phase1.items():
        errors = len(r.samples) - len(r.ok)
        print(f"{name:<14}{r.req_per_s:>8.1f}{r.pct('ttft_s', 50) * 1000:>9.0f}m"
              f"{r.pct('ttft_s', 99) * 1000:>9.0f}m{r.pct('total_s', 50) * 1000:>9.0f}m"
              f"{r.pct('total_s', 99) * 1000:>9.0f}m{errors:>8}")  # fmt: skip
    print(f"cross-routed requests (an engine asked for a model it does not serve): {cross}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=32, help="MAX_ACTIVE of each worker")
    ap.add_argument("--seconds", type=float, default=20, help="phase 1's length")
    ap.add_argument("--batch-lines", type=int, default=400)
    ap.add_argument("--batch-ms", type=int, default=1000, help="one batch request's duration")
    ap.add_argument("--out", type=Path, default=ROOT / "var/bench/fleet.png")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        fleet = start_fleet(Path(tmp), a.slots)
        try:
            wait_capacity(fleet, a.slots)
            phase1 = asyncio.run(interactive(fleet, a.slots, a.seconds))
            stats = {m: sim_stats(fleet.sims[m]) for m in MODELS}
            cross = sum(int(s["not_found"]) for s in stats.values())
            cross += sum(n for m, s in stats.items() for k, n in s["by_model"].items() if k != m)
            report(phase1, cross)
            runs = []
            for name, probe in (("batch alone", False), ("batch + interactive", True)):
                run = asyncio.run(batch(fleet, a.batch_lines, a.batch_ms, a.slots, probe))
                runs.append((name, run))
            ideal = math.ceil(a.batch_lines / (2 * a.slots)) * a.batch_ms / 1000
            print(
                f"\nPhases 2-3: a batch of {a.batch_lines} x {a.batch_ms} ms on alpha's "
                f"{2 * a.slots} idle slots (2 workers); ideal makespan {ideal:.1f} s"
            )
            for name, run in runs:
                print(f"  {name:<20} makespan {run.makespan_s:5.1f} s   slots busy while lines "
                      f"remained {run.busy_share:6.1%}")  # fmt: skip
            waits = sorted(runs[1][1].probe_waits_s)
            if waits:
                p50 = waits[len(waits) // 2] * 1000
                print(f"  interactive requests during the batch: {len(waits)}, wait for a slot "
                      f"p50 {p50:.0f} ms, max {waits[-1] * 1000:.0f} ms (one batch job: "
                      f"{a.batch_ms} ms)")  # fmt: skip
            plot(runs, a.slots, a.out)
            print(f"\nplot: {a.out}")
        finally:
            for p in reversed(fleet.procs):
                p.kill()


if __name__ == "__main__":
    main()
