"""Autoscaling on the queue signal, closed loop on loopback: scale from zero, up, down, to zero.

    python -m bench.autoscale [--phases 0:5,2:15,10:20,2:15,0:40] [--cold-start-s 3] [--out PNG]

What the Helm chart's KEDA ScaledObject does in a cluster, played here with processes: a
gateway (the model in SCALE_TO_ZERO_MODELS), a simulator engine, and a scaler that reads the
gateway's ``api_model_desired_workers`` every ``--scrape-s`` (Prometheus' scrape) and acts
every ``--poll-s`` (KEDA's polling) as KEDA and the HPA would with the chart's settings:
0 -> 1 at once when the signal is above 0; up to the signal at once (AverageValue, threshold
1); down one worker per ``--stabilize-s`` while the signal stays lower; 1 -> 0 after
``--cooldown-s`` of a zero signal. A new worker starts ``--cold-start-s`` after it is asked
for (a pod's scheduling and model load); a removed one drains (SIGTERM).

Load: open-loop Poisson arrivals of streamed requests, phases of ``rate:seconds``. Prints a
timeline and, per phase, requests, statuses, TTFT p50/p95, and the workers used; then the
cold start (first request from zero to its first token), time back to zero, and
worker-seconds against a fleet kept at its peak size all along.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.processes import Proc, service_env, start_gateway, start_redis, start_sim, start_worker
from llmq.shared import sse

MODEL = "m"
_SIGNAL = re.compile(r'^api_model_desired_workers\{model="m"\} (\S+)$', re.M)
_WAITING = re.compile(r'^api_queue_depth\{model="m"\} (\S+)$', re.M)


@dataclass
class Request:
    phase: int
    sent: float
    status: int = 0
    ttft: float | None = None


@dataclass
class Scaler:
    """KEDA + HPA as the chart configures them, on workers started as processes."""

    args: argparse.Namespace
    logdir: Path
    env: dict[str, str]
    metrics_url: str
    workers: list[Proc] = field(default_factory=list)
    starting: int = 0
    signal: float = 0.0
    waiting: float = 0.0
    worker_seconds: float = 0.0
    timeline: list[tuple[float, float, int, int, float]] = field(default_factory=list)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no worker, none starting

    async def scrape(self, client: httpx.AsyncClient) -> None:
        text = (await client.get(self.metrics_url)).text
        found, waiting = _SIGNAL.search(text), _WAITING.search(text)
        self.signal = float(found.group(1)) if found else 0.0
        self.waiting = float(waiting.group(1)) if waiting else 0.0

    async def start_one(self) -> None:
        self.starting += 1
        await asyncio.sleep(self.args.cold_start_s)
        proc = await asyncio.to_thread(start_worker, self.logdir, self.env)
        self.workers.append(proc)
        self.starting -= 1

    async def stop_one(self) -> None:
        if not self.workers:  # the one to stop is still starting
            return
        proc = self.workers.pop()
        await asyncio.to_thread(proc.stop, 30)

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        a = self.args
        last_scrape = last_down = zero_since = -1e9
        tasks: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(timeout=5) as client:
            while not stop.is_set():
                now = time.monotonic()
                if now - last_scrape >= a.scrape_s:
                    await self.scrape(client)
                    last_scrape = now
                target = min(a.max_workers, max(0, int(self.signal)))
                current = len(self.workers) + self.starting
                zero_since = zero_since if self.signal == 0 else now
                cooled = now - zero_since >= a.cooldown_s  # KEDA's cooldownPeriod
                if target > current:
                    for _ in range(target - current):
                        tasks.add(asyncio.create_task(self.start_one()))
                    last_down = now  # a scale-up restarts the stabilization window
                elif current > max(target, 1) and now - last_down >= a.stabilize_s:
                    tasks.add(asyncio.create_task(self.stop_one()))
                    last_down = now
                elif target == 0 and current == len(self.workers) == 1 and cooled:
                    tasks.add(asyncio.create_task(self.stop_one()))
                tasks = {t for t in tasks if not t.done()}
                if self.workers or self.starting:
                    self.idle.clear()
                else:
                    self.idle.set()
                self.worker_seconds += len(self.workers) * a.poll_s
                self.timeline.append(
                    (now - t0, self.signal, len(self.workers), self.starting, self.waiting)
                )
                await asyncio.sleep(a.poll_s)
            await asyncio.gather(*tasks, return_exceptions=True)


async def one(client: httpx.AsyncClient, url: str, req: Request, tokens: int) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    body["sim"] = {"tokens": tokens}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            req.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                return
            async for chunk in sse.events(resp.aiter_lines()):
                if req.ttft is None and (chunk.get("choices") or []):
                    req.ttft = time.monotonic() - req.sent
    except (httpx.HTTPError, sse.StreamEndedEarly):
        req.status = req.status or -1


async def load(url: str, phases: list[tuple[float, float]], tokens: int) -> list[Request]:
    rng = random.Random(7)
    out: list[Request] = []
    tasks = []
    async with httpx.AsyncClient(timeout=300) as client:
        for i, (rate, seconds) in enumerate(phases):
            end = time.monotonic() + seconds
            while rate > 0 and (now := time.monotonic()) < end:
                req = Request(i, now)
                out.append(req)
                tasks.append(asyncio.create_task(one(client, url, req, tokens)))
                await asyncio.sleep(min(rng.expovariate(rate), max(0.0, end - now)))
            if rate == 0:
                await asyncio.sleep(seconds)
        await asyncio.gather(*tasks)
    return out


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(args: argparse.Namespace, reqs: list[Request], scaler: Scaler, t0: float) -> None:
    print("\n   t(s)  signal  workers  starting  waiting")
    for t, sig, w, s, waiting in scaler.timeline[:: max(1, int(2 / args.poll_s))]:
        print(f"{t:7.1f} {sig:7.0f} {w:8d} {s:9d} {waiting:8.0f}")
    print("\nphase  rate/s  secs  requests  200  other  TTFT p50 (s)  p95 (s)")
    for i, (rate, secs) in enumerate(args.phases):
        mine = [r for r in reqs if r.phase == i]
        ok = [r.ttft for r in mine if r.status == 200 and r.ttft is not None]
        other = len(mine) - len(ok)
        p50, p95 = pct(ok, 50), pct(ok, 95)
        print(f"{i:5d} {rate:7.1f} {secs:5.0f} {len(mine):9d} {len(ok):4d} {other:6d}"
              f" {p50:13.2f} {p95:8.2f}")  # fmt: skip
    statuses: dict[int, int] = {}
    for r in reqs:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    first = min(reqs, key=lambda r: r.sent) if reqs else None
    peak = max((w for _, _, w, _, _ in scaler.timeline), default=0)
    last_load = max((r.sent for r in reqs), default=t0) - t0
    zero_at = next(
        (t for t, _, w, s, _ in scaler.timeline if t > last_load and w + s == 0), float("nan")
    )
    span = scaler.timeline[-1][0] if scaler.timeline else 0.0
    print(f"\nstatuses: {dict(sorted(statuses.items()))}")
    if first is not None:
        print(f"cold start: first request (from zero workers) got its first token after "
              f"{first.ttft if first.ttft is not None else float('nan'):.2f} s "
              f"(status {first.status}; cold start {args.cold_start_s} s)")  # fmt: skip
    print(f"peak workers {peak}; back to zero {zero_at - last_load:.1f} s after the last "
          f"request (cooldown {args.cooldown_s} s)")  # fmt: skip
    print(
        f"worker-seconds {scaler.worker_seconds:.0f}, against {peak * span:.0f} for "
        f"{peak} workers kept all along ({scaler.worker_seconds / max(1, peak * span):.0%})"
    )
    if args.out:
        plot(args.out, reqs, scaler, t0)


def plot(out: Path, reqs: list[Request], scaler: Scaler, t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ts = [row[0] for row in scaler.timeline]
    top.step(ts, [row[1] for row in scaler.timeline], where="post", label="desired (signal)")
    top.step(ts, [row[2] for row in scaler.timeline], where="post", label="workers ready")
    top.plot(ts, [row[4] for row in scaler.timeline], alpha=0.5, label="waiting jobs")
    top.set_ylabel("count")
    top.legend(loc="upper right")
    ok = [(r.sent - t0, r.ttft) for r in reqs if r.status == 200 and r.ttft is not None]
    bottom.scatter([x for x, _ in ok], [y for _, y in ok], s=4, label="TTFT of each request")
    bottom.set_ylabel("TTFT (s)")
    bottom.set_xlabel("time (s)")
    bottom.set_yscale("log")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


async def run(args: argparse.Namespace) -> None:
    logdir = Path(tempfile.mkdtemp(prefix="llmq-autoscale-"))
    redis = start_redis(logdir)
    sim = start_sim(logdir, "--model", MODEL, "--ttft-ms", "20", "--itl-ms", str(args.itl_ms))
    env = service_env(
        f"redis://127.0.0.1:{redis.port}/0",
        sim.url,
        scale_to_zero_models=MODEL,
        max_active=args.slots,
        queue_max=args.queue_max,
        queue_timeout_s=args.queue_timeout_s,
        scale_target_wait_s=args.target_wait_s,
        drain_timeout_s=30,
    )
    gw = start_gateway(logdir, env, wait_ready=False)
    scaler = Scaler(args, logdir, env, f"http://127.0.0.1:{gw.metrics_port}/metrics")
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(150):  # the gateway's own readiness: no engine needed
                try:
                    if (await c.get(gw.url + "/health?scope=gateway")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        stop = asyncio.Event()
        t0 = time.monotonic()
        scaling = asyncio.create_task(scaler.run(t0, stop))
        reqs = await load(gw.url, args.phases, args.tokens)
        await asyncio.sleep(2 * args.poll_s)
        await scaler.idle.wait()  # back to zero
        await asyncio.sleep(2)
        stop.set()
        await scaling
        report(args, reqs, scaler, t0)
    finally:
        for p in [*scaler.workers, gw, sim, redis]:
            p.kill()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phases", default="0:5,2:15,10:20,2:15,0:40",
                    help="rate/s:seconds,... of open-loop arrivals")  # fmt: skip
    ap.add_argument("--slots", type=int, default=4, help="MAX_ACTIVE per worker")
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--cold-start-s", type=float, default=3.0)
    ap.add_argument("--scrape-s", type=float, default=1.0)
    ap.add_argument("--poll-s", type=float, default=0.5)
    ap.add_argument("--stabilize-s", type=float, default=8.0)
    ap.add_argument("--cooldown-s", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--itl-ms", type=float, default=10.0)
    ap.add_argument("--queue-max", type=int, default=200)
    ap.add_argument("--queue-timeout-s", type=float, default=30.0)
    ap.add_argument("--target-wait-s", type=float, default=2.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.phases = [tuple(float(x) for x in p.split(":")) for p in args.phases.split(",")]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
