"""An engine's time per output token and time to first token against its running streams.

    .venv/bin/python -m bench.engine_curve [--engine both|vllm|sim] [--conc 1,2,4,8]
        [--tokens 64] [--rounds 3] [--itl-curve "1:..,8:.."] [--ttft-ms N]

Sends ``c`` concurrent greedy streams of ``--tokens`` tokens straight to the engine, ``--rounds``
times per concurrency ``c``, and prints each concurrency's mean time per output token (a
stream's time from its first token to its end over its tokens after the first) and time to
first token. ``vllm``: the real vLLM CPU build serving the bundled model (as scripts/run.sh
installs it); ``sim``: the simulator with ``--itl-curve`` (``bench.sim_load``); ``both``
(default): vLLM first, then the simulator on the curve made of vLLM's own points (its TTFT
at one stream), and how far apart they are: the check that the simulator's load model
behaves like the engine it stands in for.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.loadgen import run
from bench.processes import BUNDLED_MODEL, Proc, spawn_vllm, start_sim, wait_for


@dataclass(frozen=True)
class Point:
    conc: int
    tpot_ms: float
    ttft_ms: float


def _body(model: str, tokens: int) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to one hundred in words."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM: exactly max_tokens (the simulator makes that many anyway)
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def measure(url: str, model: str, concs: list[int], tokens: int, rounds: int) -> list[Point]:
    points = []
    asyncio.run(run(url, _body(model, tokens), 2, 1))  # warm-up
    for c in concs:
        result = asyncio.run(run(url, _body(model, tokens), c * rounds, c))
        ok = [s for s in result.ok if s.tokens > 1]
        tpot = statistics.fmean((s.total_s - s.ttft_s) / (s.tokens - 1) for s in ok)
        ttft = statistics.fmean(s.ttft_s for s in ok)
        points.append(Point(c, tpot * 1000, ttft * 1000))
        print(f"  c={c:<3} tpot {tpot * 1000:7.2f} ms  ttft {ttft * 1000:8.1f} ms  ({len(ok)} ok)")
    return points


def curve_of(points: list[Point]) -> str:
    return ",".join(f"{p.conc}:{p.tpot_ms:.2f}" for p in points)


def _up(proc: Proc) -> None:
    wait_for(lambda: httpx.get(proc.url + "/v1/models").status_code == 200, 900, proc.name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("both", "vllm", "sim"), default="both")
    ap.add_argument("--conc", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--itl-curve", default="1:10,8:14")
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    a = ap.parse_args(argv)
    concs = [int(c) for c in a.conc.split(",")]
    logdir = Path(tempfile.mkdtemp(prefix="llmq-curve-"))
    curve, ttft = a.itl_curve, a.ttft_ms
    real: list[Point] = []
    if a.engine in ("both", "vllm"):
        print("vLLM CPU build, bundled model:")
        vllm = spawn_vllm(logdir, max_model_len=2048, max_num_seqs=max(concs))
        try:
            _up(vllm)
            real = measure(vllm.url, BUNDLED_MODEL, concs, a.tokens, a.rounds)
        finally:
            vllm.stop()
        curve, ttft = curve_of(real), real[0].ttft_ms
    if a.engine in ("both", "sim"):
        print(f"simulator, --itl-curve {curve} --ttft-ms {ttft:.1f}:")
        sim = start_sim(logdir, "--itl-curve", curve, "--ttft-ms", f"{ttft:.1f}")
        try:
            simulated = measure(sim.url, "sim-model", concs, a.tokens, a.rounds)
        finally:
            sim.stop()
        for r, s in zip(real, simulated, strict=False):
            print(
                f"  c={r.conc:<3} tpot: vLLM {r.tpot_ms:7.2f} ms, simulator {s.tpot_ms:7.2f} ms "
                f"({(s.tpot_ms / r.tpot_ms - 1) * 100:+.1f} %);  ttft: vLLM {r.ttft_ms:7.1f} ms, "
                f"simulator {s.ttft_ms:7.1f} ms ({(s.ttft_ms / r.ttft_ms - 1) * 100:+.1f} %)"
            )
    print(f"logs in {logdir}")


if __name__ == "__main__":
    main()
