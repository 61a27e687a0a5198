"""Recovery times when parts fail, with default settings: a table, not a test.

    python -m bench.chaos [--streams 8] [--queued 10]

Each scenario starts its own redis-server (AOF), engine simulator, worker(s) and gateway on
loopback, puts ``--streams`` streaming jobs on the engine (held mid-stream) and ``--queued``
more in the queue, breaks one part, and measures:

- time to error: from the failure to the last affected streaming client's error event
  (or, where no client is left, to the engine seeing its stream abandoned);
- time to recover: from the failure (or from Redis being back) to the first 200 of a
  new request, or to the slot being free again;
- what else must hold: processes alive, queued jobs served exactly once, 500s seen.

The tests in tests/chaos assert the same outcomes with generous bounds; this prints the
figures. Timings depend on the machine; run it on an idle one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from bench.processes import Proc, service_env, start_gateway, start_redis, start_sim, start_worker
from llmq.shared import sse


@dataclass
class Rig:
    logdir: Path
    redis: Proc
    sim: Proc
    procs: list[Proc] = field(default_factory=list)

    def env(self, **settings: object) -> dict[str, str]:
        return service_env(f"redis://127.0.0.1:{self.redis.port}/0", self.sim.url, **settings)

    def worker(self, **settings: object) -> Proc:
        self.procs.append(start_worker(self.logdir, self.env(log_level="WARNING", **settings)))
        return self.procs[-1]

    def gateway(self, **settings: object) -> Proc:
        self.procs.append(start_gateway(self.logdir, self.env(log_level="WARNING", **settings)))
        return self.procs[-1]

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.sim.url + "/sim/stats").json())

    def close(self) -> None:
        for p in [*reversed(self.procs), self.sim, self.redis]:
            p.kill()


@dataclass
class Row:
    scenario: str
    time_to_error_s: float | None
    time_to_recover_s: float | None
    notes: str


def _body(**sim: object) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "sim": sim,
    }


async def _stream(c: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, str, float]:
    """(status, last error code or "", monotonic time the stream ended)."""
    code = ""
    try:
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                err = json.loads(await resp.aread())["error"]["code"]
                return resp.status_code, err, time.monotonic()
            async for chunk in sse.events(resp.aiter_lines()):
                if "error" in chunk:
                    code = chunk["error"]["code"]
    except (httpx.HTTPError, sse.StreamEndedEarly):
        code = "connection_lost"
    return 200, code, time.monotonic()


async def _until(check: Callable[[], Awaitable[bool]], limit: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")


async def _first_200(c: httpx.AsyncClient, url: str, codes: list[int]) -> float:
    async def ok() -> bool:
        try:
            resp = await c.post(
                url + "/v1/chat/completions", json={**_body(tokens=1), "stream": False}
            )
        except httpx.HTTPError:
            return False
        codes.append(resp.status_code)
        return resp.status_code == 200

    return await _until(ok)


async def _held(rig: Rig, name: str, n: int) -> None:
    async def check() -> bool:
        return int(rig.stats()["held"].get(name, 0)) == n

    await _until(check)


Tasks = list[asyncio.Task[tuple[int, str, float]]]


def _holding(c: httpx.AsyncClient, gw: Proc, n: int) -> Tasks:
    """``n`` streams that the engine holds after their first token."""
    return [asyncio.create_task(_stream(c, gw.url, _body(tokens=20, hold="h"))) for _ in range(n)]


async def _load(
    c: httpx.AsyncClient, rig: Rig, gw: Proc, a: argparse.Namespace
) -> tuple[Tasks, Tasks]:
    held = _holding(c, gw, a.streams)
    await _held(rig, "h", a.streams)
    queued = [asyncio.create_task(_stream(c, gw.url, _body(tokens=3))) for _ in range(a.queued)]
    await asyncio.sleep(0.5)  # let the queued requests be admitted (bench, not a test)
    return held, queued


async def worker_kill(rig: Rig, a: argparse.Namespace) -> Row:
    victim = rig.worker(max_active=a.streams)
    gw = rig.gateway(queue_mode="reject")
    async with httpx.AsyncClient(timeout=120) as c:
        held = _holding(c, gw, a.streams)
        await _held(rig, "h", a.streams)
        victim.popen.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.gather(*held)
        store = redis.Redis(port=rig.redis.port)

        async def reclaimed() -> bool:
            places = [cast(int, store.zcard(k)) for k in store.scan_iter("llmq:model:*:admitted")]
            return sum(places) == 0

        places = await _until(reclaimed)
        store.close()
        rig.worker(max_active=a.streams)
        codes: list[int] = []
        back = await _first_200(c, gw.url, codes)
    told = max(r[2] for r in results) - t0
    errs = sorted({r[1] for r in results})
    return Row(
        "worker kill -9 (reject mode; replacement started once places were free)",
        told,
        back - t0,
        f"{a.streams} streams -> {errs}; places reclaimed at {places - t0:.2f}s; "
        f"500s: {codes.count(500)}",
    )


async def redis_restart(rig: Rig, a: argparse.Namespace, down_s: float) -> Row:
    worker = rig.worker(max_active=a.streams)
    gw = rig.gateway()
    async with httpx.AsyncClient(timeout=120) as c:
        held, queued = await _load(c, rig, gw, a)
        rig.redis.stop()
        t0 = time.monotonic()
        results = await asyncio.gather(*held)
        told = max(r[2] for r in results) - t0
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - t0)))
        rig.redis = start_redis(
            rig.logdir, port=rig.redis.port, data_dir=rig.logdir, persistent=True
        )
        t_up = time.monotonic()
        await c.post(rig.sim.url + "/sim/release/h")
        codes: list[int] = []
        back = await _first_200(c, gw.url, codes)
        served = await asyncio.gather(*queued)
    ok = sum(1 for s in served if s[0] == 200 and not s[1])
    alive = worker.alive() and gw.alive()
    return Row(
        f"redis restart (down {down_s:g}s, AOF)",
        told,
        back - t_up,
        f"streams -> {sorted({r[1] for r in results})}; queued served {ok}/{a.queued}; "
        f"processes alive: {alive}; 500s: {codes.count(500)}",
    )


async def redis_freeze(rig: Rig, a: argparse.Namespace, frozen_s: float) -> Row:
    worker = rig.worker(max_active=a.streams)
    gw = rig.gateway()
    async with httpx.AsyncClient(timeout=120) as c:
        held = _holding(c, gw, a.streams)
        await _held(rig, "h", a.streams)
        rig.redis.signal(signal.SIGSTOP)
        t0 = time.monotonic()

        async def arriving(delay: float) -> float:
            """A request sent ``delay`` after the freeze (some are caught mid-way): its wait."""
            await asyncio.sleep(delay)
            s0 = time.monotonic()
            await c.post(gw.url + "/v1/chat/completions", json=_body())
            return time.monotonic() - s0

        delays = (0.0, 0.3, 0.6, 1.0, 1.3, 1.6, 2.0, 3.0)
        arrivals = [asyncio.create_task(arriving(d)) for d in delays]
        h0 = time.monotonic()
        health = (await c.get(gw.url + "/health")).status_code
        health_s = time.monotonic() - h0
        r0 = time.monotonic()
        refused = (await c.post(gw.url + "/v1/chat/completions", json=_body())).status_code
        refuse_s = time.monotonic() - r0

        waits = await asyncio.gather(*arrivals)
        results = await asyncio.gather(*held)
        told = max(r[2] for r in results) - t0
        await asyncio.sleep(max(0.0, frozen_s - (time.monotonic() - t0)))
        rig.redis.signal(signal.SIGCONT)
        t_up = time.monotonic()
        await c.post(rig.sim.url + "/sim/release/h")
        codes: list[int] = []
        back = await _first_200(c, gw.url, codes)
    return Row(
        f"redis frozen {frozen_s:g}s (SIGSTOP)",
        told,
        back - t_up,
        f"/health {health} in {health_s:.2f}s; new request {refused} in {refuse_s:.2f}s; "
        f"requests sent 0-3 s into it answered within {max(waits):.2f}s; "
        f"streams -> {sorted({r[1] for r in results})}; alive: {worker.alive() and gw.alive()}",
    )


async def gateway_kill(rig: Rig, a: argparse.Namespace) -> Row:
    rig.worker(max_active=a.streams)
    gw = rig.gateway()
    async with httpx.AsyncClient(timeout=120) as c:
        held = [
            asyncio.create_task(_stream(c, gw.url, _body(tokens=3000, itl_ms=20, hold="h")))
            for _ in range(a.streams)
        ]
        await _held(rig, "h", a.streams)
        gw.popen.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        await c.post(rig.sim.url + "/sim/release/h")
        await asyncio.gather(*held)

        async def stopped() -> bool:
            return bool(int(rig.stats()["streams_abandoned"]) == a.streams)

        done = await _until(stopped)
    return Row(
        "gateway kill -9",
        None,
        done - t0,
        f"{a.streams} orphaned jobs stopped in the engine (ORPHAN_GRACE_S=10)",
    )


async def engine_kill(rig: Rig, a: argparse.Namespace) -> Row:
    rig.worker(max_active=a.streams)
    gw = rig.gateway()
    async with httpx.AsyncClient(timeout=120) as c:
        held = _holding(c, gw, a.streams)
        await _held(rig, "h", a.streams)
        rig.sim.kill()
        t0 = time.monotonic()
        results = await asyncio.gather(*held)
    return Row(
        "engine kill -9",
        max(r[2] for r in results) - t0,
        None,
        f"streams -> {sorted({r[1] for r in results})}",
    )


SCENARIOS: dict[str, Callable[[Rig, argparse.Namespace], Coroutine[Any, Any, Row]]] = {
    "worker-kill": worker_kill,
    "redis-restart": lambda rig, a: redis_restart(rig, a, 2.0),
    "redis-down-20s": lambda rig, a: redis_restart(rig, a, 20.0),
    "redis-freeze": lambda rig, a: redis_freeze(rig, a, 5.0),
    "redis-freeze-20": lambda rig, a: redis_freeze(rig, a, 20.0),
    "gateway-kill": gateway_kill,
    "engine-kill": engine_kill,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--queued", type=int, default=10)
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    a = ap.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="llmq-chaos-") as tmp:
        for name in a.only or list(SCENARIOS):
            logdir = Path(tmp) / name
            logdir.mkdir()
            rig = Rig(
                logdir,
                start_redis(logdir, data_dir=logdir, persistent=True),
                start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5"),
            )
            try:
                rows.append(asyncio.run(SCENARIOS[name](rig, a)))
            finally:
                rig.close()
            print(_fmt(rows[-1]), flush=True)
    print("\n| scenario | time to error (s) | time to recover (s) | notes |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r.scenario} | {_s(r.time_to_error_s)} | {_s(r.time_to_recover_s)} | {r.notes} |")


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt(r: Row) -> str:
    error, recover = _s(r.time_to_error_s), _s(r.time_to_recover_s)
    return f"{r.scenario}: error {error} s, recover {recover} s; {r.notes}"


if __name__ == "__main__":
    main()
