"""Cache-aware pickup, measured: growing conversations on engines with prefix caches, with
PREFIX_AFFINITY off and then on, the same workload each time.

    python -m bench.affinity [--workers 4] [--slots 8] [--conversations 32] [--turns 8]
                             [--out var/bench/affinity.png]

Per run: redis-server, ``--workers`` simulator engines (each with a prefix cache of
``--cache-tokens`` tokens, ``--prefill-us`` of prefill per prompt token it does not hold, TTFT
20 ms beyond that, ITL 5 ms, 24-token answers), a worker per engine with ``--slots`` slots and
a gateway. ``--conversations`` conversations, each under one of ``--prompts`` system prompts,
start over the first second and grow turn by turn for ``--turns`` turns (a ~100-token
question each, the engine's answer kept in the history), with exponential think times
(mean ``--think-ms``) between turns; every request streams.

Prints, per mode: the engines' prefix cache hit rate (tokens found cached / tokens looked up,
as vLLM's ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` count them), TTFT p50 and
p99 (all turns, and turns after the first), the workers' affinity picks (hit, miss, cold),
how long left jobs waited for their warm worker, and the workers' pickup latency (enqueue to
start) p50/p99, then the checks of the issue: hit rate on >= 80 %, off about 1/N, TTFT p50
lower with affinity, and pickup p99 with affinity no later than without it plus
AFFINITY_MAX_WAIT_MS (a job left or passed over waits that long at most before the next free
slot takes it; under saturation its wait also holds the queueing it would have had anyway).
Writes a plot (TTFT by turn, hit rate) to ``--out``.

``--vllm``: real vLLM CPU engines serving the bundled model instead of simulators (their own
prefix caches and counters, ``vllm:prefix_cache_hits`` / ``_queries``), kept for both modes,
each mode with conversations of its own; e.g. ``--vllm --workers 2 --slots 4
--conversations 8 --turns 4 --system-tokens 300 --question-tokens 40 --answer-tokens 12``
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import one
from bench.processes import (
    BUNDLED_MODEL,
    ROOT,
    Proc,
    free_port,
    service_env,
    spawn_vllm,
    start_gateway,
    start_redis,
    start_sim,
    start_worker,
    wait_for,
)

MODEL = "sim-model"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray"]  # fmt: skip


@dataclass
class Conversation:
    name: str
    system: str
    questions: list[str]
    thinks_s: list[float]
    start_s: float


def _text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens (4 characters each) of words."""
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < tokens * 4:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def workload(a: argparse.Namespace, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    systems = [f"System prompt {seed}.{i}. " + _text(rng, a.system_tokens)
               for i in range(a.prompts)]  # fmt: skip
    return [
        Conversation(
            name=f"c{seed}.{i}",
            system=systems[i % a.prompts],
            questions=[
                f"c{seed}.{i} turn {t}: " + _text(rng, a.question_tokens) for t in range(a.turns)
            ],
            thinks_s=[rng.expovariate(1000 / a.think_ms) for _ in range(a.turns)],
            start_s=rng.uniform(0, 1),
        )
        for i in range(a.conversations)
    ]


@dataclass
class Run:
    mode: str
    ttft_by_turn: dict[int, list[float]] = field(default_factory=dict)
    failed: int = 0
    hits: int = 0
    queries: int = 0
    picks: dict[str, float] = field(default_factory=dict)
    waits: tuple[float, float, float] = (0, 0, 0)  # count, sum (s), upper bound of the max
    pickup: dict[float, float] = field(default_factory=dict)  # bucket le -> count

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def ttft(self, q: int, first_turn: int = 0) -> float:
        values = sorted(v for t, vs in self.ttft_by_turn.items() if t >= first_turn for v in vs)
        if len(values) < 2:
            return values[0] if values else float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def converse(
    client: httpx.AsyncClient, url: str, c: Conversation, run: Run, extra: dict[str, Any]
) -> None:
    await asyncio.sleep(c.start_s)
    messages: list[dict[str, str]] = [{"role": "system", "content": c.system}]
    for turn, (question, think) in enumerate(zip(c.questions, c.thinks_s, strict=True)):
        messages.append({"role": "user", "content": question})
        body = {"model": MODEL, "messages": messages, "stream": True, **extra}
        sample = await one(client, url, body)
        if not sample.ok:
            run.failed += 1
            return
        run.ttft_by_turn.setdefault(turn, []).append(sample.ttft_s)
        messages.append({"role": "assistant", "content": sample.text})
        await asyncio.sleep(think)


async def drive(url: str, convs: list[Conversation], run: Run, extra: dict[str, Any]) -> None:
    limits = httpx.Limits(max_connections=len(convs) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(converse(client, url, c, run, extra) for c in convs))


def _families(url: str) -> dict[str, Any]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def engine_counts(engines: list[Proc], vllm: bool) -> tuple[int, int]:
    """Prompt tokens found in the engines' prefix caches, and looked up, so far."""
    hits = queries = 0
    for e in engines:
        if not vllm:
            stats = httpx.get(e.url + "/sim/stats", timeout=10).json()
            hits, queries = hits + int(stats["prefix_hits"]), queries + int(stats["prefix_queries"])
            continue
        fams = _families(e.url)
        hits += int(sum(s.value for s in fams["vllm:prefix_cache_hits"].samples
                        if s.name.endswith("_total")))  # fmt: skip
        queries += int(sum(s.value for s in fams["vllm:prefix_cache_queries"].samples
                           if s.name.endswith("_total")))  # fmt: skip
    return hits, queries


def collect(run: Run, workers: list[Proc]) -> None:
    count = total = 0.0
    bound = 0.0
    for w in workers:
        fams = _families(f"http://127.0.0.1:{w.metrics_port}")
        for s in fams["worker_affinity_picks"].samples:
            if s.name.endswith("_total"):
                run.picks[s.labels["result"]] = run.picks.get(s.labels["result"], 0) + s.value
        buckets = [
            s for s in fams["worker_affinity_wait_seconds"].samples if s.name.endswith("_bucket")
        ]
        n = max((s.value for s in buckets), default=0)
        count += n
        total += sum(
            s.value for s in fams["worker_affinity_wait_seconds"].samples if s.name.endswith("_sum")
        )
        firsts = [float(s.labels["le"]) for s in buckets if n and s.value >= n]
        bound = max(bound, min(firsts) if firsts else 0.0)
        for s in fams["worker_pickup_latency_seconds"].samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                run.pickup[le] = run.pickup.get(le, 0) + s.value
    run.waits = (count, total, bound)


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """A histogram's ``q`` quantile, interpolated inside its bucket (Prometheus' way)."""
    les = sorted(buckets)
    total = buckets[les[-1]] if les else 0
    if not total:
        return float("nan")
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le in les:
        n = buckets[le]
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return les[-1]


def run_mode(
    mode: str, a: argparse.Namespace, convs: list[Conversation], logdir: Path, engines: list[Proc]
) -> Run:
    """One pass of the workload with PREFIX_AFFINITY ``mode``: Redis, a worker per engine
    and a gateway, started for it; the engines' cache counts are taken before and after."""
    procs: list[Proc] = []
    try:
        redis = start_redis(logdir)
        procs.append(redis)
        url = f"redis://127.0.0.1:{redis.port}/0"
        settings = {"prefix_affinity": mode, "affinity_max_wait_ms": a.max_wait_ms,
                    "queue_timeout_s": 300, "request_timeout_s": 600,
                    "log_level": "WARNING"}  # fmt: skip
        workers = []
        for engine in engines:
            port = free_port()
            env = service_env(
                url, engine.url, max_active=a.slots, worker_metrics_port=port, **settings
            )
            w = start_worker(logdir, env)
            w.metrics_port = port
            workers.append(w)
        procs += workers
        gateway = start_gateway(logdir, service_env(url, engines[0].url, **settings))
        procs.append(gateway)
        slots = len(engines) * a.slots
        wait_for(lambda: httpx.get(gateway.url + "/health").json().get("capacity") == slots,
                 60, "every worker ready")  # fmt: skip
        run = Run(mode)
        hits0, queries0 = engine_counts(engines, a.vllm)
        extra: dict[str, Any] = {}
        if a.vllm:
            extra = {"model": BUNDLED_MODEL, "max_tokens": a.answer_tokens, "temperature": 0}
        t0 = time.perf_counter()
        asyncio.run(drive(gateway.url, convs, run, extra))
        print(f"  {mode}: {sum(len(v) for v in run.ttft_by_turn.values())} requests in "
              f"{time.perf_counter() - t0:.1f} s, {run.failed} failed")  # fmt: skip
        hits, queries = engine_counts(engines, a.vllm)
        run.hits, run.queries = hits - hits0, queries - queries0
        collect(run, workers)
        return run
    finally:
        for p in reversed(procs):
            p.kill()


def start_engines(a: argparse.Namespace, logdir: Path) -> list[Proc]:
    if not a.vllm:
        flags = ("--ttft-ms", "20", "--itl-ms", "5", "--tokens", str(a.answer_tokens),
                 "--prefix-cache-tokens", str(a.cache_tokens), "--prefill-us-per-token",
                 str(a.prefill_us))  # fmt: skip
        return [start_sim(logdir, *flags) for _ in range(a.workers)]
    engines = [spawn_vllm(logdir, max_model_len=2048, max_num_seqs=a.slots)
               for _ in range(a.workers)]  # fmt: skip
    for e in engines:
        wait_for(partial(_answers, e), 600, "vLLM to serve")
    return engines


def _answers(engine: Proc) -> bool:
    return httpx.get(engine.url + "/v1/models").status_code == 200


def report(runs: list[Run], a: argparse.Namespace) -> None:
    print(f"\n{'':<26}" + "".join(f"{r.mode:>14}" for r in runs))

    def picks(r: Run) -> str:
        return "/".join(f"{r.picks.get(k, 0):.0f}" for k in ("hit", "miss", "cold"))

    def wait_mean(r: Run) -> str:
        return f"{r.waits[1] / r.waits[0] * 1000:.1f}" if r.waits[0] else "-"

    rows: list[tuple[str, Any]] = [
        ("prefix cache hit rate", lambda r: f"{r.hit_rate:.1%}"),
        ("TTFT p50 (ms)", lambda r: f"{r.ttft(50) * 1000:.0f}"),
        ("TTFT p99 (ms)", lambda r: f"{r.ttft(99) * 1000:.0f}"),
        ("TTFT p50, turns 2+ (ms)", lambda r: f"{r.ttft(50, 1) * 1000:.0f}"),
        ("TTFT p99, turns 2+ (ms)", lambda r: f"{r.ttft(99, 1) * 1000:.0f}"),
        ("picks hit/miss/cold", picks),
        ("jobs left for a warm one", lambda r: f"{r.waits[0]:.0f}"),
        ("  their wait mean (ms)", wait_mean),
        ("  their wait max <= (ms)", lambda r: f"{r.waits[2] * 1000:.0f}" if r.waits[0] else "-"),
        ("pickup p50 (ms)", lambda r: f"{bucket_quantile(r.pickup, 0.5) * 1000:.1f}"),
        ("pickup p99 (ms)", lambda r: f"{bucket_quantile(r.pickup, 0.99) * 1000:.1f}"),
        ("failed requests", lambda r: f"{r.failed}"),
    ]  # fmt: skip
    for label, cell in rows:
        print(f"{label:<26}" + "".join(f"{cell(r):>14}" for r in runs))
    by = {r.mode: r for r in runs}
    if {"on", "off"} <= set(by):
        on, off = by["on"], by["off"]
        checks = [
            (f"hit rate with affinity >= 80 % ({on.hit_rate:.1%})", on.hit_rate >= 0.8),
            (f"hit rate without is about 1/N = {1 / a.workers:.0%} ({off.hit_rate:.1%})",
             off.hit_rate < 0.5),
            ("TTFT p50 lower with affinity", on.ttft(50) < off.ttft(50)),
            (f"pickup p99 with affinity <= without + AFFINITY_MAX_WAIT_MS ({a.max_wait_ms} ms)",
             bucket_quantile(on.pickup, 0.99) <= bucket_quantile(off.pickup, 0.99)
             + a.max_wait_ms / 1000),
            ("no request failed", on.failed == off.failed == 0),
        ]  # fmt: skip
        print()
        for what, ok in checks:
            print(f"check: {what}: {'PASS' if ok else 'FAIL'}")


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        turns = sorted(r.ttft_by_turn)
        p50 = [statistics.median(r.ttft_by_turn[t]) * 1000 for t in turns]
        left.plot([t + 1 for t in turns], p50, marker="o", label=f"affinity {r.mode}")
    left.set(xlabel="turn", ylabel="TTFT p50 (ms)", title="Time to first token by turn")
    left.legend()
    right.bar([f"affinity {r.mode}" for r in runs], [r.hit_rate * 100 for r in runs])
    right.set(ylabel="%", title="Engines' prefix cache hit rate (tokens)", ylim=(0, 100))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=8, help="MAX_ACTIVE of each worker")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4, help="system prompts the conversations share")
    ap.add_argument("--system-tokens", type=int, default=150)
    ap.add_argument("--question-tokens", type=int, default=60)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--think-ms", type=float, default=300)
    ap.add_argument("--cache-tokens", type=int, default=10_000, help="each engine's prefix cache")
    ap.add_argument("--prefill-us", type=float, default=300, help="per prompt token not cached")
    ap.add_argument("--max-wait-ms", type=int, default=50, help="AFFINITY_MAX_WAIT_MS")
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "var/bench/affinity.png")
    ap.add_argument(
        "--vllm",
        action="store_true",
        help="real vLLM CPU engines (the bundled model) instead of simulators",
    )
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
        engines: list[Proc] = []
        try:
            for i, mode in enumerate(a.modes.split(",")):
                if not a.vllm or not engines:  # simulators: fresh caches for each mode
                    for e in engines:
                        e.kill()
                    engines = start_engines(a, Path(tmp))
                # The same workload for each mode, but on vLLM (whose caches outlive a mode)
                # other conversations: nothing cached by one mode serves the next.
                convs = workload(a, a.seed + (i if a.vllm else 0))
                runs.append(run_mode(mode, a, convs, Path(tmp), engines))
        finally:
            for e in engines:
                e.kill()
    report(runs, a)
    plot(runs, a.out)
    print(f"\nplot: {a.out}")


if __name__ == "__main__":
    main()
