"""Scheduling to service levels, measured: a bursty mixed workload on two workers, each with
its own simulator under load, run with today's fixed slots in arrival order and with
deadlines (and adaptive slots).

    .venv/bin/python -m bench.slo [--seconds 40] [--fixed 32] [--sweep 8,16,24,32]
        [--out slo.png] [--seed 7]

The engines (``bench.sim_load``): the time per output token grows with the running batch
(``CURVE``: 20 ms alone, 50 ms at 19 streams, 80 ms at 32), a KV cache of ``KV_TOKENS``
tokens each (the latest request preempted beyond it), prefill 30 ms plus 200 us per prompt
token, up to 8 at once (a GPU engine batches prompts), slowed as the batch is. The
workload, the same arrivals in every run (``--seed``):

- **chat** (key ``app``): time-to-first-token objective 500 ms, time per output token 50 ms,
  48 tokens; Poisson arrivals at 3/s, bursts of 14/s for 5 s at 5 s and 25 s;
- **agent** steps (the same key ``app``): objective 10 s, 160 tokens, 1.5/s;
- **batch** (key ``batch``, band low): 32 clients sending 128-token requests back to back,
  a backlog that takes whatever capacity is left.

Runs: ``fifo`` (MAX_ACTIVE ``--fixed``, no objective sent: every job due at QUEUE_TIMEOUT_S,
so a key's jobs go in arrival order, as before this feature); ``deadlines`` (the same slots,
each request's objective sent as X-TTFT-Objective-Ms: earliest deadline first within the
key, refused at once when unattainable, dropped when its deadline passes); ``deadlines+auto``
(MAX_ACTIVE=auto, TPOT_OBJECTIVE_MS=45: a little under the 50 ms chat is promised, for the
jitter between the engine and the client); then ``deadlines`` at each ``--sweep`` value of
MAX_ACTIVE. Per class: requests sent, served, refused (429), attainment (met its objectives /
sent), goodput (met per second of the arrival window), TTFT and TPOT p50/p99 of the served;
and the total completion tokens per second. A plot goes to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from bench.processes import (
    Proc,
    service_env,
    start_gateway,
    start_redis,
    start_sim,
    start_worker,
    wait_for,
)
from llmq.shared import sse
from llmq.shared.protocol import Band, KeyLimits
from llmq.shared.queue.apikeys import KeyStore

CURVE = "1:20,8:30,19:50,32:80,64:160"
KV_TOKENS = 6000
TPOT_OBJECTIVE_MS = 50
TPOT_KEPT_MS = 45  # the workers' TPOT_OBJECTIVE_MS with MAX_ACTIVE=auto
BATCH_LANES = 32


@dataclass(frozen=True)
class Klass:
    name: str
    key: str
    tokens: int
    ttft_ms: int = 0  # 0: no objective
    tpot_ms: int = 0


CHAT = Klass("chat", "app", 48, 500, TPOT_OBJECTIVE_MS)
AGENT = Klass("agent", "app", 160, 10_000)
BATCH = Klass("batch", "batch", 128)
CLASSES = (CHAT, AGENT, BATCH)


@dataclass
class Result:
    klass: Klass
    status: int = 0
    code: str = ""
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    tokens: int = 0

    @property
    def served(self) -> bool:
        return self.status == 200 and self.tokens > 0

    @property
    def met(self) -> bool:
        k = self.klass
        if not self.served:
            return False
        if k.ttft_ms and self.ttft_s * 1000 > k.ttft_ms:
            return False
        return not (k.tpot_ms and self.tpot_s * 1000 > k.tpot_ms)


@dataclass
class Run:
    label: str
    window_s: float
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def of(self, k: Klass) -> list[Result]:
        return [r for r in self.results if r.klass is k]

    def goodput(self, k: Klass) -> float:
        return sum(r.met for r in self.of(k)) / self.window_s

    def attainment(self, k: Klass) -> float:
        sent = self.of(k)
        return sum(r.met for r in sent) / len(sent) if sent else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall_s


def arrivals(seconds: float, seed: int) -> list[tuple[float, Klass]]:
    """The open-loop arrivals of chat and agent requests (the batch lanes are closed-loop)."""
    rng = random.Random(seed)
    out: list[tuple[float, Klass]] = []

    def poisson(k: Klass, rate: float, start: float, end: float) -> None:
        t = start + rng.expovariate(rate)
        while t < end:
            out.append((t, k))
            t += rng.expovariate(rate)

    poisson(CHAT, 3.0, 0, seconds)
    for burst in (5.0, 25.0):
        if burst + 5 <= seconds:
            poisson(CHAT, 11.0, burst, burst + 5)  # on top of the 3/s: 14/s
    poisson(AGENT, 1.5, 0, seconds)
    return sorted(out, key=lambda a: a[0])


def payload(k: Klass) -> dict[str, Any]:
    words = " ".join(["context"] * 60)
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": f"{k.name}: {words}"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "sim": {"tokens": k.tokens},
    }


async def send(c: httpx.AsyncClient, url: str, k: Klass, secret: str, deadlines: bool) -> Result:
    headers = {"Authorization": f"Bearer {secret}"}
    if deadlines and k.ttft_ms:
        headers["X-TTFT-Objective-Ms"] = str(k.ttft_ms)
    out = Result(k)
    t0 = time.monotonic()
    first = 0.0
    try:
        async with c.stream("POST", url + "/v1/chat/completions", json=payload(k),
                            headers=headers) as resp:  # fmt: skip
            out.status = resp.status_code
            if resp.status_code != 200:
                out.code = str(json.loads(await resp.aread())["error"]["code"])
                return out
            async for chunk in sse.events(resp.aiter_lines()):
                if chunk.get("usage"):
                    out.tokens = int(chunk["usage"].get("completion_tokens") or 0)
                choices = chunk.get("choices") or []
                if not first and choices and choices[0].get("delta", {}).get("content"):
                    first = time.monotonic()
                if "error" in chunk:
                    out.status, out.code = 500, str(chunk["error"].get("code"))
    except (httpx.HTTPError, sse.StreamEndedEarly):
        out.status, out.code = 599, "transport"
        return out
    end = time.monotonic()
    out.ttft_s = first - t0 if first else end - t0
    out.tpot_s = (end - first) / (out.tokens - 1) if first and out.tokens > 1 else 0.0
    return out


async def workload(url: str, secrets: dict[str, str], seconds: float, seed: int,
                   deadlines: bool) -> tuple[list[Result], float]:  # fmt: skip
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.monotonic()
        results: list[Result] = []

        async def timed(at: float, k: Klass) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            results.append(await send(c, url, k, secrets[k.key], deadlines))

        async def lane() -> None:
            while time.monotonic() - t0 < seconds:
                results.append(await send(c, url, BATCH, secrets["batch"], deadlines))

        await asyncio.gather(
            *(timed(at, k) for at, k in arrivals(seconds, seed)),
            *(lane() for _ in range(BATCH_LANES)),
        )
        return results, time.monotonic() - t0


async def _keys(redis_url: str) -> dict[str, str]:
    """The workload's API keys (``app``, and ``batch`` in the low band): their secrets."""
    redis = Redis.from_url(redis_url)
    try:
        store = KeyStore(redis)
        _, app = await store.create("app", KeyLimits())
        _, batch = await store.create("batch", KeyLimits(priority=Band.LOW))
        return {"app": app, "batch": batch}
    finally:
        await redis.aclose()


def one_run(label: str, slots: str, deadlines: bool, a: argparse.Namespace) -> Run:
    """A fresh Redis, two simulators with a worker each, a gateway; the workload."""
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="llmq-slo-") as tmp:
        logdir = Path(tmp)
        try:
            redis = start_redis(logdir)
            procs.append(redis)
            redis_url = f"redis://127.0.0.1:{redis.port}/0"
            settings: dict[str, object] = dict(
                auth="keys", queue_max=1000, queue_timeout_s=30, request_timeout_s=300,
                log_level="WARNING", max_active=slots,
            )  # fmt: skip
            if slots == "auto":  # kept a little under what chat is promised (jitter on the way)
                settings.update(tpot_objective_ms=TPOT_KEPT_MS, max_active_ceiling=64)
            sims = [
                start_sim(logdir, "--itl-curve", CURVE, "--ttft-ms", "30",
                          "--prefill-us-per-token", "200", "--kv-tokens", str(KV_TOKENS),
                          "--prefill-parallel", "8")
                for _ in range(2)
            ]  # fmt: skip
            procs += sims
            for n, sim in enumerate(sims):
                env = service_env(redis_url, sim.url, worker_id=f"w{n}", **settings)
                procs.append(start_worker(logdir, env))
            gw = start_gateway(logdir, service_env(redis_url, sims[0].url, **settings))
            procs.append(gw)
            secrets = asyncio.run(_keys(redis_url))
            wait_for(
                lambda: httpx.get(gw.url + "/health").json().get("capacity", 0) > 0,
                30, "capacity",
            )  # fmt: skip
            results, wall = asyncio.run(workload(gw.url, secrets, a.seconds, a.seed, deadlines))
            return Run(label, a.seconds, results, wall)
        finally:
            for p in reversed(procs):
                p.kill()


def _ms(values: list[float], q: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0] * 1000:.0f}"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1000:.0f}"


def table(runs: list[Run]) -> str:
    head = (f"{'run':<22} {'class':<6} {'sent':>5} {'served':>6} {'429':>5} {'attained':>8} "
            f"{'goodput/s':>9} {'ttft p50/p99 ms':>16} {'tpot p50/p99 ms':>16}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for run in runs:
        for k in CLASSES:
            rs = run.of(k)
            served = [r for r in rs if r.served]
            ttft = [r.ttft_s for r in served]
            tpot = [r.tpot_s for r in served if r.tpot_s]
            refused = sum(r.status == 429 for r in rs)
            attained = f"{run.attainment(k) * 100:.0f} %" if k.ttft_ms else "-"
            goodput = f"{run.goodput(k):.2f}" if k.ttft_ms else "-"
            lines.append(
                f"{run.label:<22} {k.name:<6} {len(rs):>5} {len(served):>6} {refused:>5} "
                f"{attained:>8} {goodput:>9} {_ms(ttft, 50) + '/' + _ms(ttft, 99):>16} "
                f"{_ms(tpot, 50) + '/' + _ms(tpot, 99):>16}"
            )
        lines.append(f"{run.label:<22} total  {run.tokens_per_s:.0f} completion tokens/s")
    return "\n".join(lines)


def plot(runs: list[Run], sweep: list[tuple[int, Run]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [r.label for r in runs]
    xs = range(len(runs))
    left.bar([x - 0.2 for x in xs], [r.goodput(CHAT) for r in runs], 0.4, label="chat")
    left.bar([x + 0.2 for x in xs], [r.goodput(AGENT) for r in runs], 0.4, label="agent")
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("goodput (requests/s that met their objectives)")
    left.legend()
    if sweep:
        slots = [s for s, _ in sweep]
        right.plot(
            slots, [r.attainment(CHAT) * 100 for _, r in sweep], "o-", label="chat attained %"
        )
        right.plot(
            slots, [r.attainment(AGENT) * 100 for _, r in sweep], "s-", label="agent attained %"
        )
        auto = runs[-1]
        right.axhline(auto.attainment(CHAT) * 100, ls="--", color="C0", label="chat, auto slots")
        right.set_xlabel("MAX_ACTIVE (deadlines on)")
        right.set_ylabel("attainment %")
        twin = right.twinx()
        twin.plot(slots, [r.tokens_per_s for _, r in sweep], "^:", color="C2")
        twin.set_ylabel("completion tokens/s (dotted)")
        right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--fixed", type=int, default=32, help="MAX_ACTIVE of the fixed runs")
    ap.add_argument("--sweep", default="8,16,24,32", help="MAX_ACTIVE values ('' for none)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("slo.png"))
    a = ap.parse_args(argv)
    runs = [
        one_run(f"fifo ({a.fixed} slots)", str(a.fixed), False, a),
        one_run(f"deadlines ({a.fixed} slots)", str(a.fixed), True, a),
        one_run("deadlines + auto slots", "auto", True, a),
    ]
    print(table(runs), flush=True)
    base, best = runs[0], runs[-1]
    print(
        f"\nchat goodput: {best.goodput(CHAT):.2f}/s with deadlines and auto slots vs "
        f"{base.goodput(CHAT):.2f}/s fifo "
        f"({best.goodput(CHAT) / max(1e-9, base.goodput(CHAT)):.2f}x); "
        f"total {best.tokens_per_s:.0f} vs {base.tokens_per_s:.0f} completion tokens/s",
        flush=True,
    )
    sweep = [
        (int(s), one_run(f"deadlines ({s} slots)", s, True, a))
        for s in filter(None, a.sweep.split(","))
    ]
    if sweep:
        print("\nsweep of fixed MAX_ACTIVE, deadlines on:")
        print(table([r for _, r in sweep]))
    plot(runs, sweep, a.out)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main()
