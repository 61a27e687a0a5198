"""Overload on loopback: does the queue tell the truth?

    python -m bench.overload [--seconds 20] [--slots 4]

A worker with ``--slots`` slots in front of a simulator (TTFT 20 ms, 16 tokens 25 ms apart:
~0.4 s a job), QUEUE_MAX 64 (more than the slots serve in the timeout), QUEUE_TIMEOUT_S 3,
API keys on. Capacity is measured first
(jobs/s with every slot busy). Then:

1. Open-loop Poisson arrivals of streamed requests (``X-Queue-Updates: true``) at 1.5x and
   3x capacity for ``--seconds`` each. Each refused request (429, 503) retries once after
   its Retry-After. Printed: statuses; the share of requests that waited and then timed out
   (goal 0: a request that cannot start in time is refused at once); refusal latency; the
   ETA error, |actual start - the ETA of its first ``: queued`` comment| (p50, p90); how
   often a client that obeys Retry-After is admitted on its retry.
2. Key A keeps 48 requests of ~1 s in flight (more than slots + queue places) while key B
   sends one request at a time, against gateways with QUEUE_MAX 16 and QUEUE_TIMEOUT_S 60
   (long jobs fit in the wait), QUEUE_FAIR_SHARE on and off: B's admitted share, and A's
   requests displaced.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from bench.processes import service_env, start_gateway, start_redis, start_sim, start_worker
from llmq.shared.protocol import KeyLimits
from llmq.shared.queue.apikeys import KeyStore

URL = "/v1/chat/completions"
BODY: dict[str, Any] = {
    "model": "sim-model",
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


@dataclass
class Outcome:
    status: int = 0
    code: str = ""
    refused_in: float = 0.0  # seconds to a refusal
    eta_s: float | None = None  # the first comment's ETA
    eta_error_s: float | None = None
    retried: bool = False
    retry_admitted: bool = False


async def one(
    c: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any] = BODY
) -> tuple[Outcome, float]:
    """One streamed request; returns its outcome and its Retry-After (0: none)."""
    out = Outcome()
    t0 = time.monotonic()
    comment_at = None
    async with c.stream("POST", URL, json=body, headers=headers) as resp:
        out.status = resp.status_code
        if resp.status_code != 200:
            raw = await resp.aread()
            out.refused_in = time.monotonic() - t0
            err = httpx.Response(resp.status_code, content=raw).json()["error"]
            out.code = "displaced" if "gave its place" in err["message"] else err["code"]
            return out, float(resp.headers.get("retry-after", 0))
        lines = resp.aiter_lines()
        async for line in lines:
            if line.startswith(": queued") and out.eta_s is None and "eta_ms=" in line:
                comment_at = time.monotonic()
                out.eta_s = int(line.rsplit("eta_ms=", 1)[1]) / 1000
            elif line.startswith("data: ") and '"content"' in line:
                if comment_at is not None and out.eta_s is not None:
                    out.eta_error_s = abs((time.monotonic() - comment_at) - out.eta_s)
                break
            elif line.startswith("data: ") and '"error"' in line:
                out.code = line.split('"code":"', 1)[1].split('"', 1)[0]
                out.status = 0
                return out, 0.0
        async for _ in lines:
            pass
    return out, 0.0


async def client(c: httpx.AsyncClient, headers: dict[str, str]) -> Outcome:
    out, retry_after = await one(c, headers)
    if retry_after:
        await asyncio.sleep(retry_after)
        again, _ = await one(c, headers)
        out.retried, out.retry_admitted = True, again.status == 200
    return out


async def capacity(url: str, headers: dict[str, str], slots: int) -> float:
    """Jobs/s with every slot busy (closed loop, ``slots`` at a time, 5 rounds)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        t0 = time.monotonic()
        n = slots * 5
        for _ in range(5):
            await asyncio.gather(*(one(c, headers) for _ in range(slots)))
        return n / (time.monotonic() - t0)


async def flood(url: str, headers: dict[str, str], rate: float, seconds: float) -> list[Outcome]:
    rng = random.Random(11)
    tasks = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(client(c, headers)))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report_flood(label: str, outs: list[Outcome]) -> None:
    codes: dict[str, int] = {}
    for o in outs:
        key = "200" if o.status == 200 else f"{o.status or 'event'} {o.code}"
        codes[key] = codes.get(key, 0) + 1
    timed_out = [o for o in outs if o.code == "queue_timeout" and o.refused_in >= 1.0]
    timed_out += [o for o in outs if o.status == 0 and o.code == "queue_timeout"]
    refused = [o.refused_in * 1000 for o in outs if o.status in (429, 503)]
    errors = [o.eta_error_s for o in outs if o.eta_error_s is not None]
    retried = [o for o in outs if o.retried]
    admitted = sum(o.retry_admitted for o in retried)
    print(f"\n{label}: {len(outs)} requests: {dict(sorted(codes.items()))}")
    print(f"  waited, then timed out: {len(timed_out)} ({len(timed_out) / len(outs):.1%})")
    if refused:
        print(f"  refusal latency p50 {pct(refused, 50):.1f} ms, p99 {pct(refused, 99):.1f} ms")
    if errors:
        print(f"  ETA error |actual - eta|: p50 {pct(errors, 50):.2f} s, p90 {pct(errors, 90):.2f}"
              f" s (over {len(errors)} requests that waited)")  # fmt: skip
    if retried:
        print(f"  obeying Retry-After: {admitted} of {len(retried)} retries admitted "
              f"({admitted / len(retried):.0%})")  # fmt: skip


async def fair_share(url: str, a: dict[str, str], b: dict[str, str], seconds: float) -> None:
    long_body = {**BODY, "sim": {"tokens": 40}}  # key A's jobs: ~1 s each
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        end = time.monotonic() + seconds
        a_codes: dict[str, int] = {}
        b_results: list[int] = []

        async def a_lane() -> None:
            while time.monotonic() < end:
                o, _ = await one(c, a, long_body)
                key = "200" if o.status == 200 else o.code
                a_codes[key] = a_codes.get(key, 0) + 1
                if o.status != 200:
                    await asyncio.sleep(0.05)

        async def b_lane() -> None:
            while time.monotonic() < end:
                o, _ = await one(c, b)
                b_results.append(o.status)
                if o.status != 200:
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(a_lane() for _ in range(48)), b_lane())
    ok = sum(s == 200 for s in b_results)
    share = ok / max(1, len(b_results))
    print(f"  key B: {ok} of {len(b_results)} requests admitted and served ({share:.0%});"
          f" key A: {dict(sorted(a_codes.items()))}")  # fmt: skip


async def run(args: argparse.Namespace) -> None:
    logdir = Path(tempfile.mkdtemp(prefix="llmq-overload-"))
    redis = start_redis(logdir)
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "25", "--tokens", "16")
    url = f"redis://127.0.0.1:{redis.port}/0"
    common = dict(auth="keys", queue_max=64, queue_timeout_s=3, max_active=args.slots)
    procs = [redis, sim]
    try:
        procs.append(start_worker(logdir, service_env(url, sim.url, **common)))
        fair = start_gateway(logdir, service_env(url, sim.url, **common))
        blind = start_gateway(logdir, service_env(url, sim.url, queue_predict=False, **common))
        # Phase 2 as the defaults' shape: 16 places, and a timeout long jobs fit in.
        places = {**common, "queue_max": 16, "queue_timeout_s": 60}
        shared = start_gateway(logdir, service_env(url, sim.url, **places))
        unfair = start_gateway(logdir, service_env(url, sim.url, queue_fair_share=False, **places))
        procs += [fair, blind, shared, unfair]
        r = Redis.from_url(url)
        store = KeyStore(r)
        secrets = {n: (await store.create(n, KeyLimits()))[1] for n in ("a", "b", "load")}
        await r.aclose()
        hdr = {n: {"Authorization": f"Bearer {s}", "X-Queue-Updates": "true"}
               for n, s in secrets.items()}  # fmt: skip
        cap = await capacity(fair.url, hdr["load"], args.slots)
        print(f"capacity: {cap:.1f} jobs/s ({args.slots} slots, ~0.4 s a job)")
        for mult in (1.5, 3.0):
            for label, gw in (("", fair), (", QUEUE_PREDICT off", blind)):
                outs = await flood(gw.url, hdr["load"], mult * cap, args.seconds)
                report_flood(f"{mult}x capacity ({mult * cap:.1f} requests/s){label}", outs)
        for label, gw in (("QUEUE_FAIR_SHARE on", shared), ("QUEUE_FAIR_SHARE off", unfair)):
            print(f"\nkey A floods (48 in flight), key B one at a time, {label}:")
            await fair_share(gw.url, hdr["a"], hdr["b"], args.seconds)
    finally:
        for p in reversed(procs):
            p.kill()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--slots", type=int, default=4)
    asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
