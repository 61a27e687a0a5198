"""What a migration costs a stream: the pause its client sees and the tokens the engines
process again, over many failures. A table, not a test.

    python -m bench.migrate [--kills 50] [--streams 4] [--engine-kills 10] [--drains 10]

A redis-server, a gateway and workers (each with its own engine simulator: 400-token answers
at 20 ms a token) on loopback, default settings (1 s heartbeats: a worker is lost 3 s after
its last beat). Each round sends ``--streams`` streams to the one worker there is, starts a
second, and once it is ready (and the streams have 30 tokens or more) breaks the first:

- ``worker``: the worker is SIGKILLed (found out when its heartbeat expires);
- ``engine``: its engine process is killed under it (found out at once);
- ``drain``: it gets SIGTERM with DRAIN_TIMEOUT_S=1 (its jobs are handed over after it).

The second one takes the first one's place in the next round. For each stream: whether its
answer is whole (the deterministic simulator's text, no error event), the pause (the
longest gap between two of its deltas), the time from the failure to the delta after that
gap; and, as the workers that took over counted them (``worker_migration_tokens_total``),
the tokens prefilled again (prompts and answers so far) and generated again (answers run
again from their start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.processes import (
    Proc,
    free_port,
    service_env,
    start_gateway,
    start_redis,
    start_sim,
    start_worker,
)

TOKENS = 400
WHOLE = "".join(f"tok{i} " for i in range(TOKENS))
PROMPT = [{"role": "user", "content": "hi"}]


@dataclass
class Pair:
    """A worker and its own engine."""

    worker: Proc
    sim: Proc
    metrics_port: int = 0

    def migration_tokens(self) -> dict[str, float]:
        """Its ``worker_migration_tokens_total`` by kind (what it processed again)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text
        found = re.findall(r'^worker_migration_tokens_total\{kind="(\w+)"\} (\S+)$', text, re.M)
        return {kind: float(v) for kind, v in found}

    def kill(self) -> None:
        self.worker.kill()
        self.sim.kill()


@dataclass
class Rig:
    logdir: Path
    redis: Proc
    gateway: Proc | None = None
    pairs: list[Pair] = field(default_factory=list)

    def env(self, engine: str, **settings: object) -> dict[str, str]:
        url = f"redis://127.0.0.1:{self.redis.port}/0"
        return service_env(url, engine, log_level="WARNING", **settings)

    def pair(self, **settings: object) -> Pair:
        sim = start_sim(self.logdir, "--ttft-ms", "10", "--itl-ms", "20")
        port = free_port()
        env = self.env(sim.url, max_active=16, worker_metrics_port=port, **settings)
        p = Pair(start_worker(self.logdir, env), sim, port)
        self.pairs.append(p)
        return p

    def close(self) -> None:
        for p in self.pairs:
            p.kill()
        if self.gateway:
            self.gateway.kill()
        self.redis.kill()


@dataclass
class Stream:
    ok: bool = False
    text: str = ""
    times: list[float] = field(default_factory=list)  # each delta's arrival (monotonic)
    job_id: str = ""
    error: str = ""


async def one(c: httpx.AsyncClient, url: str, out: Stream) -> None:
    body = {"model": "sim-model", "messages": PROMPT, "stream": True,
            "stream_options": {"include_usage": True}, "sim": {"tokens": TOKENS}}  # fmt: skip
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.error = chunk["error"]["code"]
                continue
            out.job_id = chunk.get("id", out.job_id)
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    out.text += text
                    out.times.append(time.monotonic())
    out.ok = out.text == WHOLE and not out.error


def ready(gw: Proc) -> int:
    return int(httpx.get(gw.url + "/health").json()["models"].get("sim-model", 0))


async def wait(check: Any, limit: float = 60) -> None:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > limit:
            raise TimeoutError("the rig did not settle")
        await asyncio.sleep(0.05)


@dataclass
class Tally:
    streams: int = 0
    whole: int = 0
    pauses: list[float] = field(default_factory=list)
    to_next: list[float] = field(default_factory=list)
    reprefilled: float = 0.0  # the workers that took over counted these
    regenerated: float = 0.0


async def round_(rig: Rig, how: str, streams: int, tally: Tally) -> None:
    gw = rig.gateway
    assert gw is not None
    (victim,) = rig.pairs
    await wait(lambda: ready(gw) == 16)
    outs = [Stream() for _ in range(streams)]
    extra = {"drain_timeout_s": 1} if how == "drain" else {}
    async with httpx.AsyncClient(timeout=120) as c:
        tasks = [asyncio.create_task(one(c, gw.url, o)) for o in outs]
        await wait(lambda: all(o.times for o in outs))
        spare = rig.pair(**extra)  # where they will go on
        await wait(lambda: ready(gw) == 32 and all(len(o.times) >= 30 for o in outs))
        t_fail = time.monotonic()
        if how == "worker":
            victim.worker.signal(signal.SIGKILL)
        elif how == "engine":
            victim.sim.kill()
        else:
            victim.worker.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    counted = spare.migration_tokens()  # (a fresh worker: this round's)
    tally.reprefilled += counted.get("reprefilled", 0.0)
    tally.regenerated += counted.get("regenerated", 0.0)
    for o in outs:
        tally.streams += 1
        tally.whole += o.ok
        if len(o.times) < 2 or o.times[-1] <= t_fail:
            continue
        # The pause: the longest gap between two deltas that ends after the failure (an
        # undisturbed stream's are ~20 ms; deltas already on their way when the worker
        # failed still arrive after it; a drain streams on for DRAIN_TIMEOUT_S first).
        pairs = enumerate(zip(o.times, o.times[1:], strict=False), 1)
        gap, at = max((b - a, i) for i, (a, b) in pairs if b > t_fail)
        tally.pauses.append(gap)
        tally.to_next.append(o.times[at] - t_fail)
    victim.kill()
    rig.pairs.remove(victim)


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def scenario(rig: Rig, how: str, rounds: int, streams: int) -> Tally:
    tally = Tally()
    for _ in range(rounds):
        await round_(rig, how, streams, tally)
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="rounds with a worker SIGKILLed")
    ap.add_argument("--engine-kills", type=int, default=10, help="rounds with an engine killed")
    ap.add_argument("--drains", type=int, default=10, help="rounds with a worker drained")
    ap.add_argument("--streams", type=int, default=4, help="streams cut each round")
    a = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="bench-migrate-"))
    rig = Rig(logdir, start_redis(logdir))
    rows = []
    try:
        for how, rounds in (("worker", a.kills), ("engine", a.engine_kills), ("drain", a.drains)):
            if not rounds:
                continue
            redis.Redis(port=rig.redis.port).flushall()
            for p in list(rig.pairs):
                p.kill()
            rig.pairs.clear()
            rig.pair(**({"drain_timeout_s": 1} if how == "drain" else {}))
            if rig.gateway is None:
                env = rig.env(rig.pairs[0].sim.url)
                rig.gateway = start_gateway(logdir, env)
            tally = asyncio.run(scenario(rig, how, rounds, a.streams))
            rows.append((how, rounds, tally))
    finally:
        rig.close()
    print("| failure | rounds | streams cut | whole answers | pause p50 / p99 (s) | "
          "failure to the delta after it p50 / p99 (s) | tokens prefilled again per stream | "
          "tokens generated again (all) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for how, rounds, t in rows:
        print(
            f"| {how} | {rounds} | {t.streams} | {t.whole} | "
            f"{pct(t.pauses, 50):.2f} / {pct(t.pauses, 99):.2f} | "
            f"{pct(t.to_next, 50):.2f} / {pct(t.to_next, 99):.2f} | "
            f"{t.reprefilled / max(1, t.streams):.0f} | {t.regenerated:.0f} |"
        )


if __name__ == "__main__":
    main()
