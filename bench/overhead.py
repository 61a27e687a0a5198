"""What the gateway + Redis queue + worker path adds over calling the engine directly.

    python -m bench.overhead [--requests 200] [--tokens 64] [--ttft-ms 20] [--itl-ms 10]

Starts redis-server, the engine simulator, one worker (MAX_ACTIVE=16) and one gateway on
loopback, then streams the same 64-token requests (a) straight to the simulator and (b)
through the gateway, at concurrency 1 and 16. Prints TTFT p50/p99 for both and what the
path adds, throughput and its ratio, and the CPU seconds the gateway and the worker spent
per 1000 requests. Goals (issue #2): <= 5 ms added p50 TTFT at concurrency 1, >= 0.9 of
direct throughput at 16. The load generator shares the machine's cores with everything.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx

from bench.loadgen import RunResult, run
from bench.processes import service_env, start_gateway, start_redis, start_sim, start_worker


def _row(label: str, r: RunResult) -> str:
    return (
        f"{label:<28} ttft p50 {r.pct('ttft_s', 50) * 1000:7.2f} ms  "
        f"p99 {r.pct('ttft_s', 99) * 1000:7.2f} ms  total p50 {r.pct('total_s', 50) * 1000:7.1f}"
        f" ms  {r.req_per_s:6.1f} req/s  {r.tokens_per_s:7.0f} tok/s  "
        f"ok {len(r.ok)}/{len(r.samples)}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="gateway path overhead vs direct engine")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ttft-ms", type=float, default=20)
    ap.add_argument("--itl-ms", type=float, default=10)
    a = ap.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    procs = []
    try:
        redis = start_redis(logdir)
        sim = start_sim(
            logdir,
            "--ttft-ms",
            str(a.ttft_ms),
            "--itl-ms",
            str(a.itl_ms),
            "--tokens",
            str(a.tokens),
        )
        procs += [redis, sim]
        env = service_env(
            f"redis://127.0.0.1:{redis.port}/0",
            sim.url,
            max_active=16,
            queue_max=256,
            log_level="WARNING",
        )
        worker = start_worker(logdir, env)
        procs.append(worker)
        gateway = start_gateway(logdir, env)
        procs.append(gateway)
        body = {
            "model": "sim-model",
            "stream": True,
            "messages": [{"role": "user", "content": "Say something."}],
        }
        asyncio.run(run(gateway.url, body, 20, 4))  # warm-up: connections, imports, caches
        asyncio.run(run(sim.url, body, 20, 4))
        print(
            f"engine simulator: ttft {a.ttft_ms} ms, itl {a.itl_ms} ms, {a.tokens} tokens; "
            f"{a.requests} requests per row"
        )
        results = {}
        for conc in (1, 16):
            n = a.requests if conc > 1 else max(50, a.requests // 2)
            direct = asyncio.run(run(sim.url, body, n, conc))
            cpu0 = (gateway.cpu_seconds(), worker.cpu_seconds())
            via = asyncio.run(run(gateway.url, body, n, conc))
            cpu1 = (gateway.cpu_seconds(), worker.cpu_seconds())
            results[conc] = (direct, via)
            print(_row(f"direct      c={conc}", direct))
            print(_row(f"via gateway c={conc}", via))
            added50 = (via.pct("ttft_s", 50) - direct.pct("ttft_s", 50)) * 1000
            added99 = (via.pct("ttft_s", 99) - direct.pct("ttft_s", 99)) * 1000
            print(
                f"  added ttft: p50 {added50:+.2f} ms  p99 {added99:+.2f} ms;  throughput "
                f"ratio {via.req_per_s / direct.req_per_s:.3f};  CPU s per 1000 requests: "
                f"gateway {(cpu1[0] - cpu0[0]) * 1000 / n:.1f}, "
                f"worker {(cpu1[1] - cpu0[1]) * 1000 / n:.1f}"
            )
        d1, v1 = results[1]
        d16, v16 = results[16]
        added = (v1.pct("ttft_s", 50) - d1.pct("ttft_s", 50)) * 1000
        ratio = v16.req_per_s / d16.req_per_s
        print(
            f"GOALS: added p50 TTFT at c=1 {added:.2f} ms (goal <= 5): "
            f"{'met' if added <= 5 else 'MISSED'};  throughput ratio at c=16 {ratio:.3f} "
            f"(goal >= 0.9): {'met' if ratio >= 0.9 else 'MISSED'}"
        )
        metrics = httpx.get(gateway.url + "/metrics").text
        rejected = [ln for ln in metrics.splitlines() if ln.startswith("api_rejections_total")]
        print("gateway rejections during the run:", rejected or "none")
    finally:
        for p in reversed(procs):
            p.kill()


if __name__ == "__main__":
    main()
