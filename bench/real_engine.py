"""Time to first token and total latency through the gateway vs straight to a real vLLM.

    .venv/bin/python -m bench.real_engine [--requests 12] [--max-tokens 32]

Starts redis-server, vLLM's CPU build serving the bundled model (from scripts/run.sh's
engine venv and model folder, or LLMQ_ENGINE_PYTHON / LLMQ_MODEL_DIR), one worker
(MAX_ACTIVE=4) and a gateway, then sends the same greedy requests directly and through the
gateway at concurrency 1 and 4. Run ``bash scripts/run.sh`` (or scripts/test.sh) once first
so the engine and the model are installed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx

from bench.loadgen import RunResult, run
from bench.processes import (
    BUNDLED_MODEL,
    service_env,
    spawn_vllm,
    start_gateway,
    start_redis,
    start_worker,
    wait_for,
)

MODEL = BUNDLED_MODEL


def _row(label: str, r: RunResult) -> str:
    return (
        f"{label:<22} ttft p50 {r.pct('ttft_s', 50) * 1000:8.1f} ms  p99 "
        f"{r.pct('ttft_s', 99) * 1000:8.1f} ms   total p50 {r.pct('total_s', 50):6.2f} s  "
        f"p99 {r.pct('total_s', 99):6.2f} s  {r.tokens_per_s:6.1f} tok/s  "
        f"ok {len(r.ok)}/{len(r.samples)}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="gateway vs direct, real vLLM on CPU")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    procs = []
    try:
        redis = start_redis(logdir)
        procs.append(redis)
        vllm = spawn_vllm(logdir, max_model_len=2048, max_num_seqs=4)
        procs.append(vllm)
        wait_for(lambda: httpx.get(vllm.url + "/v1/models").status_code == 200, 600, "vLLM")
        env = service_env(
            f"redis://127.0.0.1:{redis.port}/0", vllm.url, max_active=4, log_level="WARNING"
        )
        procs.append(start_worker(logdir, env))
        gateway = start_gateway(logdir, env)
        procs.append(gateway)
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": a.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about Paris."}],
        }
        asyncio.run(run(vllm.url, body, 2, 1))  # warm-up
        print(f"vLLM CPU, {MODEL}, {a.max_tokens} tokens per request, greedy")
        for conc in (1, 4):
            direct = asyncio.run(run(vllm.url, body, a.requests, conc))
            via = asyncio.run(run(gateway.url, body, a.requests, conc))
            print(_row(f"direct      c={conc}", direct))
            print(_row(f"via gateway c={conc}", via))
            ttft = (via.pct("ttft_s", 50) - direct.pct("ttft_s", 50)) * 1000
            total = (via.pct("total_s", 50) - direct.pct("total_s", 50)) * 1000
            print(f"  added: ttft p50 {ttft:+.1f} ms, total p50 {total:+.1f} ms")
    finally:
        for p in reversed(procs):
            p.kill()


if __name__ == "__main__":
    main()
