"""Token-path throughput at high concurrency: the engine direct vs through llmq.

    python -m bench.scale [--conc 1,16,64,128,256] [--rounds 3] [--gateways 1]
                          [--out var/bench/scale.png] [--profile [DIR]]

Starts redis-server, the engine simulator (TTFT 20 ms, ITL 5 ms, 64-token streams), one
worker and the gateway (``--gateways`` processes: GATEWAY_PROCESSES) on loopback. For each
concurrency c it streams the same requests straight to the simulator and through the
gateway, in alternating batches so both paths see the same machine noise, and prints one
row per c: throughput of both and their ratio, TTFT p50/p99 of both and what llmq adds, CPU
seconds per 1000 streams spent by the gateway, the worker and Redis (each with all its
processes) and by the load generator itself, and errors (a stream that failed, or whose
text differs from the engine's), and the same CPU as µs per token for each process. Then it
checks the goals and writes a PNG plot of throughput and TTFT against concurrency.

``--profile``: one more run through llmq at c = 64 (``--profile-c``) under py-spy (gateway
and worker) and Redis' ``INFO commandstats``, each summarized (the functions taking the most
samples, self and total; Redis' time per command); the raw profiles go to DIR.

Everything shares this machine's cores: the load generator and the simulator take CPU the
engine of a real deployment would not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.loadgen import RunResult, merge, run
from bench.processes import ROOT, LocalStack, Proc, local_stack, start_otlp_receiver
from bench.profile import redis_commands, sampled, summarize

PROFILE_REQUESTS_PER_LANE = 8
BODY = {
    "model": "sim-model",
    "stream": True,
    "messages": [{"role": "user", "content": "Say something."}],
    # Tokens are counted from the usage: a busy worker gets several per delta.
    "stream_options": {"include_usage": True},
}


@dataclass
class Row:
    c: int
    n: int
    direct: RunResult
    via: RunResult
    cpu: dict[str, float]  # CPU-s per 1000 streams through llmq, by process kind
    loadgen_cpu: float  # the load generator's CPU-s per 1000 streams (either path)
    errors: int
    engine_cpu: tuple[float, float] = (0.0, 0.0)  # the simulator's CPU-s/1k: direct, via llmq

    @property
    def deltas(self) -> float:
        """Content deltas per stream through llmq (the tokens, unless the engine batched)."""
        ok = self.via.ok
        return sum(s.deltas for s in ok) / len(ok) if ok else 0.0

    @property
    def ratio(self) -> float:
        return self.via.req_per_s / self.direct.req_per_s

    def added_ms(self, q: int) -> float:
        return (self.via.pct("ttft_s", q) - self.direct.pct("ttft_s", q)) * 1000

    @property
    def service_cpu(self) -> float:
        return sum(self.cpu.values())

    def us_per_token(self, kind: str, tokens: int) -> float:
        """CPU µs per token of one process kind (its CPU per stream over the tokens)."""
        return self.cpu[kind] * 1000 / tokens


def _errors(result: RunResult, expected: str, tokens: int) -> int:
    return sum(1 for s in result.samples if not s.ok or s.tokens != tokens or s.text != expected)


def measure(
    c: int, n: int, rounds: int, sim: Proc, gateway_url: str, procs: dict[str, list[Proc]]
) -> tuple[RunResult, RunResult, dict[str, float], float, tuple[float, float]]:
    direct: list[RunResult] = []
    via: list[RunResult] = []
    cpu = dict.fromkeys(procs, 0.0)
    loadgen = 0.0
    engine = [0.0, 0.0]  # the simulator's CPU serving the direct path, the llmq path
    for _ in range(rounds):
        e0 = sim.cpu_seconds()
        direct.append(asyncio.run(run(sim.url, BODY, n // rounds, c)))
        e1 = sim.cpu_seconds()
        before = {k: sum(p.cpu_seconds() for p in ps) for k, ps in procs.items()}
        t0 = time.process_time()
        via.append(asyncio.run(run(gateway_url, BODY, n // rounds, c)))
        loadgen += time.process_time() - t0
        for k, ps in procs.items():
            cpu[k] += sum(p.cpu_seconds() for p in ps) - before[k]
        engine[0] += e1 - e0
        engine[1] += sim.cpu_seconds() - e1
    done = rounds * (n // rounds)
    return (
        merge(direct),
        merge(via),
        {k: v * 1000 / done for k, v in cpu.items()},
        loadgen * 1000 / done,
        (engine[0] * 1000 / done, engine[1] * 1000 / done),
    )


def print_header() -> None:
    print(
        f"{'c':>4} {'direct r/s':>10} {'llmq r/s':>9} {'ratio':>6} "
        f"{'ttft p50 d/l ms':>16} {'added p50':>9} {'added p99':>9} "
        f"{'CPU-s/1k: gw':>12} {'worker':>7} {'redis':>6} {'total':>6} {'loadgen':>8} "
        f"{'µs/token: gw':>12} {'worker':>7} {'redis':>6} {'err':>4} "
        f"{'deltas':>6} {'engine CPU-s/1k d/l':>19}"
    )


def print_row(r: Row, tokens: int) -> None:
    per = [r.us_per_token(k, tokens) for k in ("gateway", "worker", "redis")]
    print(
        f"{r.c:>4} {r.direct.req_per_s:>10.1f} {r.via.req_per_s:>9.1f} {r.ratio:>6.2f} "
        f"{r.direct.pct('ttft_s', 50) * 1000:>7.1f}/{r.via.pct('ttft_s', 50) * 1000:<8.1f} "
        f"{r.added_ms(50):>+9.1f} {r.added_ms(99):>+9.1f} "
        f"{r.cpu['gateway']:>12.1f} {r.cpu['worker']:>7.1f} {r.cpu['redis']:>6.1f} "
        f"{r.service_cpu:>6.1f} {r.loadgen_cpu:>8.1f} "
        f"{per[0]:>12.0f} {per[1]:>7.0f} {per[2]:>6.0f} {r.errors:>4} "
        f"{r.deltas:>6.1f} {r.engine_cpu[0]:>9.1f}/{r.engine_cpu[1]:<9.1f}"
    )


GOALS = {  # c -> minimal throughput ratio to the engine's own
    64: 0.85,
    128: 0.6,
}
CPU_GOAL_C64 = 4.0  # CPU-s per 1000 streams at c = 64, gateway + worker + Redis
# c = 1: what llmq adds to TTFT p50 may not grow: +4.6 to +6.2 ms measured on the 2-core
# development machine (2026-12-01); the check allows the top of that range.
ADDED_TTFT_C1_MS = 6.2


def print_goals(rows: list[Row]) -> None:
    by_c = {r.c: r for r in rows}
    verdicts = []
    if 1 in by_c:
        added = by_c[1].added_ms(50)
        verdicts.append(
            f"c=1 added TTFT p50 {added:+.2f} ms (<= {ADDED_TTFT_C1_MS}): "
            f"{_ok(added <= ADDED_TTFT_C1_MS)}"
        )
    for c, goal in GOALS.items():
        if c in by_c:
            verdicts.append(
                f"ratio c={c} {by_c[c].ratio:.2f} (>= {goal}): {_ok(by_c[c].ratio >= goal)}"
            )
    if 64 in by_c:
        cpu = by_c[64].service_cpu
        verdicts.append(
            f"CPU-s/1k at c=64 {cpu:.1f} (<= {CPU_GOAL_C64}): {_ok(cpu <= CPU_GOAL_C64)}"
        )
    errors = sum(r.errors for r in rows)
    verdicts.append(f"errors {errors} (0): {_ok(errors == 0)}")
    print("GOALS: " + ";  ".join(verdicts))


def _ok(met: bool) -> str:
    return "met" if met else "MISSED"


def plot(rows: list[Row], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r.c for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(cs, [r.direct.req_per_s for r in rows], "o-", label="engine direct")
    left.plot(cs, [r.via.req_per_s for r in rows], "s-", label="through llmq")
    left.set(xscale="log", xlabel="concurrent streams", ylabel="streams/s", title="Throughput")
    for q, style in ((50, "-"), (99, "--")):
        right.plot(cs, [r.direct.pct("ttft_s", q) * 1000 for r in rows], "o" + style,
                   label=f"direct p{q}")  # fmt: skip
        right.plot(cs, [r.via.pct("ttft_s", q) * 1000 for r in rows], "s" + style,
                   label=f"llmq p{q}")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="TTFT")
    for ax in (left, right):
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def profile(outdir: Path, c: int, stack: LocalStack, kinds: dict[str, list[Proc]]) -> None:
    """One more run through llmq at ``c`` (``PROFILE_REQUESTS_PER_LANE`` requests per
    lane) under py-spy and Redis' command statistics; prints the summaries."""
    client = redis.Redis(port=stack.redis.port)
    client.config_resetstat()
    pids = {k: ps[0].popen.pid for k, ps in kinds.items() if k != "redis"}
    with sampled(pids, outdir) as files:
        asyncio.run(run(stack.gateway.url, BODY, PROFILE_REQUESTS_PER_LANE * c, c))
    print(f"\nProfile at c={c} (raw py-spy output in {outdir}):")
    for name, path in files.items():
        print(f"--- {name} ---")
        print("\n".join(summarize(path)))
    print("--- redis ---")
    print("\n".join(redis_commands(client)))
    client.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,16,64,128,256")
    ap.add_argument("--rounds", type=int, default=3, help="alternating direct/llmq batches")
    ap.add_argument("--min-requests", type=int, default=30, help="per path at each c")
    ap.add_argument("--per-lane", type=int, default=4, help="requests per concurrent lane")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ttft-ms", type=float, default=20)
    ap.add_argument("--itl-ms", type=float, default=5)
    ap.add_argument("--gateways", type=int, default=1, help="GATEWAY_PROCESSES")
    ap.add_argument("--out", type=Path, default=ROOT / "var/bench/scale.png")
    ap.add_argument(
        "--profile",
        type=Path,
        nargs="?",
        const=ROOT / "var/bench/profile",
        default=None,
        help="profile a run at --profile-c; raw profiles to DIR",
    )
    ap.add_argument("--profile-c", type=int, default=64)
    ap.add_argument(
        "--stream-frame-ms", type=int, default=None, help="the worker's STREAM_FRAME_MS"
    )
    ap.add_argument(
        "--tracing",
        action="store_true",
        help="trace every request: gateway and worker export OTLP to a bench.otlp_receiver",
    )
    ap.add_argument(
        "--trace-ratio",
        type=float,
        default=1.0,
        help="with --tracing: the share of requests sampled (parentbased_traceidratio)",
    )
    a = ap.parse_args(argv)
    concs = [int(c) for c in a.conc.split(",")]
    sim_args = ("--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms), "--tokens", str(a.tokens))
    settings: dict[str, object] = {
        "max_active": max(concs),
        "queue_max": max(concs),
        "log_level": "WARNING",
    }
    if a.stream_frame_ms is not None:
        settings["stream_frame_ms"] = a.stream_frame_ms
    with contextlib.ExitStack() as cleanup:
        if a.tracing:  # every request sampled unless --trace-ratio; the SDK's export batches
            logdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="otlp-")))
            receiver = start_otlp_receiver(logdir)
            cleanup.callback(receiver.kill)
            settings.update(otel_exporter_otlp_endpoint=receiver.url)
            if a.trace_ratio < 1:
                settings.update(otel_traces_sampler="parentbased_traceidratio",
                                otel_traces_sampler_arg=a.trace_ratio)  # fmt: skip
        _measure(a, concs, sim_args, settings)


def _measure(
    a: argparse.Namespace, concs: list[int], sim_args: tuple[str, ...], settings: dict[str, object]
) -> None:
    with local_stack("llmq-scale-", sim_args, gateway_processes=a.gateways, **settings) as stack:
        sim, gateway = stack.sim, stack.gateway
        kinds = {"gateway": [gateway], "worker": [stack.worker], "redis": [stack.redis]}
        asyncio.run(run(gateway.url, BODY, 40, 8))  # warm-up both paths
        asyncio.run(run(sim.url, BODY, 40, 8))
        expected = asyncio.run(run(sim.url, BODY, 1, 1)).samples[0].text
        print(
            f"engine simulator: TTFT {a.ttft_ms:g} ms, ITL {a.itl_ms:g} ms, {a.tokens} "
            f"tokens; gateway processes {a.gateways}, "
            f"MAX_ACTIVE {max(concs)}; {a.rounds} alternating rounds per c; "
            f"tracing {f'on (sampled {a.trace_ratio:g})' if a.tracing else 'off'}"
        )
        rows = []
        print_header()
        for c in concs:
            n = max(a.min_requests, a.per_lane * c)
            n -= n % a.rounds
            direct, via, cpu, loadgen, engine = measure(c, n, a.rounds, sim, gateway.url, kinds)
            errors = _errors(direct, expected, a.tokens) + _errors(via, expected, a.tokens)
            rows.append(Row(c, n, direct, via, cpu, loadgen, errors, engine))
            print_row(rows[-1], a.tokens)
        if a.profile:
            profile(a.profile, a.profile_c, stack, kinds)
    print_goals(rows)
    plot(rows, a.out)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main()
