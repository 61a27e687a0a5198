"""Fair queuing under a flood: does a light tenant still get served while another floods?

    python -m bench.tenants [--requests 20] [--flood 30] [--slots 4]

Starts redis-server, the engine simulator (TTFT 20 ms, ITL 10 ms, 16 tokens: one job holds a
slot ~170 ms), one worker with ``--slots`` slots and one gateway with API keys. Key B sends
``--requests`` streaming requests one at a time, first alone, then while key A keeps
``--flood`` requests in flight (each one replaced as soon as it ends). Prints B's success
rate and TTFT p50/p99 in both runs, and how much the flood added, against one slot turnover
(goal: B served 100 %, p50 within +1 turnover). FIFO would put B behind A's backlog:
``flood / slots`` turnovers.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from bench.loadgen import RunResult, Sample, one
from bench.processes import Proc, service_env, start_gateway, start_redis, start_sim, start_worker
from llmq.shared.protocol import KeyLimits
from llmq.shared.queue.apikeys import KeyStore

BODY = {
    "model": "sim-model",
    "stream": True,
    "messages": [{"role": "user", "content": "Say something."}],
}


async def _keys(redis_url: str) -> tuple[str, str]:
    redis = Redis.from_url(redis_url)
    try:
        store = KeyStore(redis)
        _, a = await store.create("flood", KeyLimits())
        _, b = await store.create("light", KeyLimits())
        return a, b
    finally:
        await redis.aclose()


async def _light(url: str, secret: str, n: int) -> RunResult:
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        t0 = time.perf_counter()
        samples: list[Sample] = [await one(client, url, BODY) for _ in range(n)]
        return RunResult(samples, time.perf_counter() - t0)


async def _with_flood(url: str, a: str, b: str, n: int, flood: int) -> tuple[RunResult, int]:
    stop = asyncio.Event()
    served = 0

    async def lane(client: httpx.AsyncClient) -> None:
        nonlocal served
        while not stop.is_set():
            await one(client, url, BODY)
            served += 1

    limits = httpx.Limits(max_connections=flood + 4)
    async with httpx.AsyncClient(
        timeout=120, headers={"Authorization": f"Bearer {a}"}, limits=limits
    ) as client:
        lanes = [asyncio.create_task(lane(client)) for _ in range(flood)]
        await asyncio.sleep(1.0)  # let A's backlog build
        result = await _light(url, b, n)
        stop.set()
        await asyncio.gather(*lanes)
    return result, served


def _report(label: str, r: RunResult) -> str:
    return (
        f"{label:<24} served {len(r.ok)}/{len(r.samples)}  TTFT p50 "
        f"{r.pct('ttft_s', 50) * 1000:7.1f} ms  p99 {r.pct('ttft_s', 99) * 1000:7.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--flood", type=int, default=30)
    ap.add_argument("--slots", type=int, default=4)
    a = ap.parse_args(argv)
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="llmq-tenants-") as tmp:
        logdir = Path(tmp)
        try:
            redis = start_redis(logdir)
            procs.append(redis)
            sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "10", "--tokens", "16")
            procs.append(sim)
            url = f"redis://127.0.0.1:{redis.port}/0"
            env = service_env(url, sim.url, max_active=a.slots, queue_max=512, log_level="WARNING")
            procs.append(start_worker(logdir, env))
            gw = start_gateway(logdir, {**env, "AUTH": "keys"})
            procs.append(gw)
            key_a, key_b = asyncio.run(_keys(url))
            alone = asyncio.run(_light(gw.url, key_b, a.requests))
            flooded, served_a = asyncio.run(_with_flood(gw.url, key_a, key_b, a.requests, a.flood))
        finally:
            for p in reversed(procs):
                p.kill()
    turnover_ms = alone.pct("total_s", 50) * 1000
    added = (flooded.pct("ttft_s", 50) - alone.pct("ttft_s", 50)) * 1000
    print(_report("B alone", alone))
    print(_report(f"B while A floods ({a.flood})", flooded))
    print(
        f"A served {served_a} requests meanwhile. One slot turnover (B's p50 total) "
        f"{turnover_ms:.1f} ms; the flood added {added:+.1f} ms to B's p50 TTFT "
        f"({added / turnover_ms:+.2f} turnovers; FIFO would add ~{a.flood / a.slots:.1f})."
    )


if __name__ == "__main__":
    main()
