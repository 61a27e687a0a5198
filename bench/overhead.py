"""What the gateway + Redis queue + worker path adds over calling the engine directly.

    python -m bench.overhead [--requests 200] [--tokens 64] [--ttft-ms 20] [--itl-ms 10]
                             [--log-level WARNING|INFO] [--log-format plain|json]

Starts redis-server, the engine simulator, one worker (MAX_ACTIVE=16) and one gateway on
loopback, then streams the same 64-token requests (a) straight to the simulator and (b)
through the gateway, at concurrency 1 and 16. Prints TTFT p50/p99 for both and what the
path adds, throughput and its ratio, and the CPU seconds the gateway and the worker spent
per 1000 requests. Goals (issue #2): <= 5 ms added p50 TTFT at concurrency 1, >= 0.9 of
direct throughput at 16. The load generator shares the machine's cores with everything.
``--log-level INFO`` (the services' default) adds the access log line per request and the
job line per job: run it against the default WARNING to see what they cost.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx

from bench.loadgen import RunResult, merge, run
from bench.processes import Proc, service_env, start_gateway, start_redis, start_sim, start_worker


def _row(label: str, r: RunResult) -> str:
    return (
        f"{label:<28} ttft p50 {r.pct('ttft_s', 50) * 1000:7.2f} ms  "
        f"p99 {r.pct('ttft_s', 99) * 1000:7.2f} ms  total p50 {r.pct('total_s', 50) * 1000:7.1f}"
        f" ms  {r.req_per_s:6.1f} req/s  {r.tokens_per_s:7.0f} tok/s  "
        f"ok {len(r.ok)}/{len(r.samples)}"
    )


def interleaved(
    direct_url: str,
    gateway_url: str,
    body: dict[str, object],
    n: int,
    conc: int,
    rounds: int,
    procs: tuple[Proc, Proc],
) -> tuple[RunResult, RunResult, tuple[float, float]]:
    """Alternate direct and gateway batches so both see the same machine noise; CPU seconds
    of (gateway, worker) are counted over the gateway batches only."""
    direct: list[RunResult] = []
    via: list[RunResult] = []
    cpu = [0.0, 0.0]
    for _ in range(rounds):
        direct.append(asyncio.run(run(direct_url, body, n // rounds, conc)))
        before = [p.cpu_seconds() for p in procs]
        via.append(asyncio.run(run(gateway_url, body, n // rounds, conc)))
        for i, p in enumerate(procs):
            cpu[i] += p.cpu_seconds() - before[i]
    return merge(direct), merge(via), (cpu[0], cpu[1])


BODY = {
    "model": "sim-model",
    "stream": True,
    "messages": [{"role": "user", "content": "Say something."}],
}


def start_stack(a: argparse.Namespace, logdir: Path, procs: list[Proc]) -> tuple[Proc, Proc, Proc]:
    """redis-server, the simulator, one worker (16 slots), one gateway: (sim, gw, worker)."""
    redis = start_redis(logdir)
    procs.append(redis)
    sim = start_sim(
        logdir, "--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms), "--tokens", str(a.tokens)
    )
    procs.append(sim)
    env = service_env(
        f"redis://127.0.0.1:{redis.port}/0",
        sim.url,
        max_active=16,
        queue_max=256,
        log_level=a.log_level,
        log_format=a.log_format,
    )
    worker = start_worker(logdir, env)
    procs.append(worker)
    gateway = start_gateway(logdir, env)
    procs.append(gateway)
    return sim, gateway, worker


def measure(
    a: argparse.Namespace, sim: Proc, gateway: Proc, worker: Proc
) -> dict[int, tuple[RunResult, RunResult]]:
    results = {}
    for conc in (1, 16):
        n = a.requests if conc > 1 else max(50, a.requests // 2)
        direct, via, cpu = interleaved(
            sim.url, gateway.url, BODY, n, conc, a.rounds, (gateway, worker)
        )
        results[conc] = (direct, via)
        print(_row(f"direct      c={conc}", direct))
        print(_row(f"via gateway c={conc}", via))
        added50 = (via.pct("ttft_s", 50) - direct.pct("ttft_s", 50)) * 1000
        added99 = (via.pct("ttft_s", 99) - direct.pct("ttft_s", 99)) * 1000
        print(
            f"  added ttft: p50 {added50:+.2f} ms  p99 {added99:+.2f} ms;  throughput "
            f"ratio {via.req_per_s / direct.req_per_s:.3f};  CPU s per 1000 requests: "
            f"gateway {cpu[0] * 1000 / n:.1f}, worker {cpu[1] * 1000 / n:.1f}"
        )
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="gateway path overhead vs direct engine")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ttft-ms", type=float, default=20)
    ap.add_argument("--itl-ms", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="alternating direct/gateway batches")
    ap.add_argument("--log-level", default="WARNING", help="INFO: with the access/job lines")
    ap.add_argument("--log-format", default="plain", choices=["plain", "json"])
    a = ap.parse_args(argv)
    procs: list[Proc] = []
    try:
        sim, gateway, worker = start_stack(a, Path(tempfile.mkdtemp(prefix="llmq-bench-")), procs)
        asyncio.run(run(gateway.url, BODY, 20, 4))  # warm-up: connections, imports, caches
        asyncio.run(run(sim.url, BODY, 20, 4))
        print(
            f"engine simulator: ttft {a.ttft_ms} ms, itl {a.itl_ms} ms, {a.tokens} tokens; "
            f"{a.requests} requests per c=16 row, alternating direct and gateway batches"
        )
        results = measure(a, sim, gateway, worker)
        (d1, v1), (d16, v16) = results[1], results[16]
        added = (v1.pct("ttft_s", 50) - d1.pct("ttft_s", 50)) * 1000
        ratio = v16.req_per_s / d16.req_per_s
        print(
            f"GOALS: added p50 TTFT at c=1 {added:.2f} ms (goal <= 5): "
            f"{'met' if added <= 5 else 'MISSED'};  throughput ratio at c=16 {ratio:.3f} "
            f"(goal >= 0.9): {'met' if ratio >= 0.9 else 'MISSED'}"
        )
        metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text
        rejected = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith("api_rejections_total") and not ln.endswith(" 0.0")
        ]
        print("gateway rejections during the run:", rejected or "none")
    finally:
        for p in reversed(procs):
            p.kill()


if __name__ == "__main__":
    main()
