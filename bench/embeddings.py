"""Embeddings throughput: 1-input requests at c = 64, through the service vs the engine direct.

    python -m bench.embeddings                  # vLLM's CPU build serving all-MiniLM-L6-v2
    python -m bench.embeddings --engine sim     # the engine simulator (--embed-dim 384)
    python -m bench.embeddings --merge off      # jobs one per engine request (no merging)

Starts redis-server, the engine, one worker (MAX_ACTIVE = the concurrency) and one gateway
on loopback, then alternates rounds: ``--requests`` 1-input embeddings requests at
``--conc`` straight to the engine, then the same through the gateway, ``--rounds`` times
each (alternated, so that a slower moment of the machine hits both). Every process, the
load generator included, shares this machine's cores. Prints each path's throughput and
latency, the ratio service / direct, the CPU each process spent per request (the engine's:
vLLM's server and engine core), and how many jobs the worker merged into each engine
request (its ``worker_embedding_request_jobs`` histogram).

``--merge off`` sets EMBED_BATCH_MAX_INPUTS=1: each job its own engine request, what the
service costs without merging. The real engine needs scripts/test.sh or scripts/run.sh to
have installed it (``.cache/engine-venv``, ``.cache/models/all-MiniLM-L6-v2``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from bench.processes import (
    EMBED_MODEL,
    Proc,
    embed_model_dir,
    engine_paths,
    free_port,
    service_env,
    spawn_vllm_embedding,
    start_gateway,
    start_redis,
    start_sim,
    start_worker,
    wait_for,
)


@dataclass
class Round:
    path: str
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    failed: int
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU-ms per request, by process


async def load(url: str, model: str, requests: int, conc: int, path: str) -> Round:
    """``requests`` 1-input requests at ``conc`` concurrent; each input differs (no cache)."""
    latencies: list[float] = []
    failed = 0
    left = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:

        async def client() -> None:
            nonlocal failed
            for i in left:
                body = {"model": model, "input": f"sentence number {i} about the weather today"}
                t0 = time.monotonic()
                async with s.post(url + "/v1/embeddings", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1
                        continue
                latencies.append(time.monotonic() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(conc)))
        wall = time.monotonic() - t0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    return Round(
        path,
        len(latencies) / wall,
        statistics.median(latencies) * 1000 if latencies else 0.0,
        p99 * 1000,
        failed,
    )


def start_engine(logdir: Path, kind: str, conc: int) -> Proc:
    if kind == "sim":
        return start_sim(logdir, "--model", EMBED_MODEL, "--embed-dim", "384")
    python, _ = engine_paths()
    model = embed_model_dir()
    if not python.exists() or not (model / "config.json").exists():
        raise SystemExit(f"no vLLM ({python}) or no embedding model ({model}): see the docstring")
    proc = spawn_vllm_embedding(logdir, max_num_seqs=max(conc, 64))
    wait_for(lambda: httpx.get(proc.url + "/v1/models").status_code == 200, 240, "vLLM")
    return proc


def merged(worker_metrics_url: str) -> tuple[float, float]:
    """(engine requests, jobs) from the worker's ``worker_embedding_request_jobs``."""
    text = httpx.get(worker_metrics_url).text
    count = re.search(r"^worker_embedding_request_jobs_count (\S+)$", text, re.M)
    total = re.search(r"^worker_embedding_request_jobs_sum (\S+)$", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merge", choices=("on", "off"), default="on")
    a = ap.parse_args(argv)
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        logdir = Path(tmp)
        try:
            redis = start_redis(logdir)
            procs.append(redis)
            engine = start_engine(logdir, a.engine, a.conc)
            procs.append(engine)
            metrics_port = free_port()
            env = service_env(
                f"redis://127.0.0.1:{redis.port}/0", engine.url, max_active=a.conc,
                queue_max=4 * a.conc, worker_metrics_port=metrics_port,
                embed_batch_max_inputs=256 if a.merge == "on" else 1, log_level="WARNING",
            )  # fmt: skip
            worker = start_worker(logdir, env)
            procs.append(worker)
            gateway = start_gateway(logdir, env)
            procs.append(gateway)
            kinds = {"engine": engine, "gateway": gateway, "worker": worker, "redis": redis}

            def ready() -> bool:
                models = httpx.get(gateway.url + "/v1/models").json()["data"]
                return any(m["id"] == EMBED_MODEL for m in models)

            wait_for(ready, 60, "the gateway to list the model")
            asyncio.run(load(engine.url, EMBED_MODEL, 200, a.conc, "warm-up"))
            asyncio.run(load(gateway.url, EMBED_MODEL, 200, a.conc, "warm-up"))
            before = merged(f"http://127.0.0.1:{metrics_port}/metrics")
            rounds: list[Round] = []
            for _ in range(a.rounds):
                for path, url in (("direct", engine.url), ("service", gateway.url)):
                    cpu0 = {k: p.cpu_seconds() for k, p in kinds.items()}
                    r = asyncio.run(load(url, EMBED_MODEL, a.requests, a.conc, path))
                    r.cpu_ms = {k: (p.cpu_seconds() - cpu0[k]) * 1000 / a.requests
                                for k, p in kinds.items()}  # fmt: skip
                    rounds.append(r)
                    cpu = "  ".join(f"{k} {v:.2f}" for k, v in r.cpu_ms.items())
                    print(f"  {path:8s} {r.rate:8.1f} req/s  p50 {r.p50_ms:7.1f} ms  "
                          f"p99 {r.p99_ms:7.1f} ms  failed {r.failed}")  # fmt: skip
                    print(f"           CPU-ms per request: {cpu}")
            after = merged(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            for p in reversed(procs):
                p.kill()
    report(a, rounds, after[0] - before[0], after[1] - before[1])


def report(a: argparse.Namespace, rounds: list[Round], requests: float, jobs: float) -> None:
    direct = [r.rate for r in rounds if r.path == "direct"]
    service = [r.rate for r in rounds if r.path == "service"]
    ratios = [s / d for s, d in zip(service, direct, strict=True)]
    print(f"\nengine={a.engine} merge={a.merge} c={a.conc} requests/round={a.requests} "
          f"rounds={a.rounds}")  # fmt: skip
    print(f"direct  req/s: {', '.join(f'{x:.1f}' for x in direct)} "
          f"(mean {statistics.mean(direct):.1f})")  # fmt: skip
    print(f"service req/s: {', '.join(f'{x:.1f}' for x in service)} "
          f"(mean {statistics.mean(service):.1f})")  # fmt: skip
    print(f"ratio service/direct per round: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(mean {statistics.mean(ratios):.2f})")  # fmt: skip
    for path in ("direct", "service"):
        mine = [r.cpu_ms for r in rounds if r.path == path]
        mean = {k: statistics.mean(c[k] for c in mine) for k in mine[0]}
        print(
            f"{path} CPU-ms per request (mean): "
            + "  ".join(f"{k} {v:.2f}" for k, v in mean.items())
            + f"  (service processes {sum(v for k, v in mean.items() if k != 'engine'):.2f})"
        )
    if requests:
        print(f"worker: {jobs:.0f} jobs in {requests:.0f} engine requests "
              f"({jobs / requests:.1f} jobs per request)")  # fmt: skip


if __name__ == "__main__":
    main()
