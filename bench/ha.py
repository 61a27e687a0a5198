"""A Sentinel-managed Redis on loopback, for the failover tests and ``bench.failover``: a
primary, a replica and three sentinels (quorum 2, ``down-after-milliseconds`` 2000)."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.loadgen import stream_chat
from bench.processes import Proc, start_redis, start_sentinel, wait_for
from local.launch import SENTINEL_MASTER

CHAT = {
    "model": "sim-model",
    "stream": True,
    "messages": [{"role": "user", "content": "hello there"}],
    "sim": {"tokens": 3},
}


@dataclass
class HaRedis:
    logdir: Path
    servers: dict[int, Proc]  # port -> redis-server (primary or replica)
    sentinels: list[Proc]
    killed: list[int] = field(default_factory=list)

    @property
    def sentinels_setting(self) -> str:
        """REDIS_SENTINELS for the services."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def primary_port(self) -> int | None:
        """The primary's port as a majority of sentinels name it (None: no majority)."""
        ports: list[int] = []
        for s in self.sentinels:
            try:
                with redis.Redis(port=s.port, socket_timeout=1) as c:
                    addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
                    ports.append(int(addr[1]))
            except (redis.RedisError, OSError, TypeError):
                continue
        best = max(set(ports), key=ports.count, default=None)
        return best if best is not None and ports.count(best) >= 2 else None

    def client(self, port: int | None = None) -> redis.Redis:
        port = port or self.primary_port()
        if port is None:
            raise RuntimeError("no primary")
        return redis.Redis(port=port, socket_timeout=2)

    def wait_ready(self, within: float = 30) -> int:
        """Until the primary has its replica connected and in sync, and every sentinel
        knows that replica (so a failover can promote it); returns the primary's port."""

        def ready() -> bool:
            port = self.primary_port()
            if port is None:
                return False
            with self.client(port) as c:
                info = c.info("replication")
            replicas = len(self.servers) - 1 - len(self.killed)
            if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < replicas:
                return False
            if sum(f"slave{i}" in info and "online" in str(info[f"slave{i}"])
                   for i in range(replicas)) < replicas:  # fmt: skip
                return False
            for s in self.sentinels:
                with redis.Redis(port=s.port, socket_timeout=1) as c:
                    if not c.execute_command("SENTINEL", "REPLICAS", SENTINEL_MASTER):
                        return False
            return True

        wait_for(ready, within, "the primary, its replica and the sentinels to agree")
        port = self.primary_port()
        assert port is not None
        return port

    def kill_primary(self) -> int:
        """kill -9 the primary; returns its port."""
        port = self.primary_port()
        assert port is not None, "no primary to kill"
        self.servers[port].signal(signal.SIGKILL)
        self.servers[port].popen.wait(timeout=10)
        self.killed.append(port)
        return port

    def wait_new_primary(self, old: int, within: float = 30) -> int:
        wait_for(lambda: self.primary_port() not in (None, old), within, "a new primary")
        port = self.primary_port()
        assert port is not None
        return port

    def restart(self, port: int) -> None:
        """A killed server back on its port: the sentinels make it a replica of the new
        primary."""
        self.servers[port] = start_redis(self.logdir, port=port)
        self.killed.remove(port)

    def close(self) -> None:
        for p in [*self.sentinels, *self.servers.values()]:
            p.kill()


@dataclass
class Answer:
    sent: float  # seconds since the kill (negative: before)
    took: float
    status: int  # 0: no answer within the client's timeout
    code: str  # the error code (HTTP body or SSE error event), "" for a completed stream
    done: bool
    probe: bool = False


async def _answer(
    c: httpx.AsyncClient, gw: Proc, payload: dict[str, Any], probe: bool, kill_at: float | None
) -> Answer:
    """One request, as an ``Answer`` (``sent``: seconds since ``kill_at``; far negative
    before the kill)."""
    t0 = time.monotonic()
    since = t0 - kill_at if kill_at is not None else -1e6
    try:
        r = await stream_chat(c, gw.url, payload)
    except httpx.TimeoutException:
        return Answer(since, time.monotonic() - t0, 0, "client_timeout", False, probe)
    codes = "".join(e.get("code", "") for e in r.sse_errors)
    code = (r.error_body or {}).get("error", {}).get("code", "") if r.error_body else ""
    return Answer(since, time.monotonic() - t0, r.status, code or codes, r.done, probe)


async def load_through_failover(
    gw: Proc,
    ha: HaRedis,
    *,
    lanes: int,
    after_s: float,
    on_kill: asyncio.Event | None = None,
    bound_s: float = 60,
    payload: dict[str, Any] | None = None,
    probe: bool = False,
    rejoin: bool = False,
) -> tuple[list[Answer], int]:
    """Streams from ``lanes`` lanes; the primary is killed once they have run 1.5 s; they
    go on until ``after_s`` after the first 200 sent after the kill. ``probe``: one more
    lane sends a request every 100 ms (5 s client timeout), never held up by a request
    that waits: its answers (``Answer.probe``) time the recovery. ``rejoin``: the killed
    server is restarted as soon as a new primary is elected (the sentinels make it a
    replica). Returns every answer and the killed port."""
    answers: list[Answer] = []
    kill_at: list[float] = []
    recovered: list[float] = []
    start = time.monotonic()

    def going() -> bool:
        if time.monotonic() - start > bound_s:
            return False
        return not recovered or time.monotonic() < recovered[0] + after_s

    async def lane(c: httpx.AsyncClient, is_probe: bool) -> None:
        while going():
            a = await _answer(c, gw, payload or CHAT, is_probe, kill_at[0] if kill_at else None)
            answers.append(a)
            if kill_at and a.sent > 0 and a.status == 200 and a.done and not a.code:
                recovered.append(time.monotonic())
            if is_probe or a.status != 200:
                await asyncio.sleep(0.1 if is_probe else 0.05)

    async with (
        httpx.AsyncClient(timeout=bound_s) as c,
        httpx.AsyncClient(timeout=5) as quick,
    ):
        tasks = [asyncio.create_task(lane(c, False)) for _ in range(lanes)]
        if probe:
            tasks.append(asyncio.create_task(lane(quick, True)))
        await asyncio.sleep(1.5)
        killed = await asyncio.to_thread(ha.kill_primary)
        kill_at.append(time.monotonic())
        if on_kill is not None:
            on_kill.set()
        if rejoin:
            await asyncio.to_thread(ha.wait_new_primary, killed)
            await asyncio.to_thread(ha.restart, killed)
        await asyncio.gather(*tasks)
    return answers, killed


def start_ha_redis(
    logdir: Path, *, replicas: int = 1, down_after_ms: int = 2000, failover_timeout_ms: int = 10_000
) -> HaRedis:
    """A primary, ``replicas`` replicas and three sentinels, ready (replicas in sync)."""
    primary = start_redis(logdir)
    servers = {primary.port: primary}
    for _ in range(replicas):
        replica = start_redis(logdir, replica_of=primary.port)
        servers[replica.port] = replica
    sentinels = [
        start_sentinel(logdir, primary.port, down_after_ms=down_after_ms,
                       failover_timeout_ms=failover_timeout_ms)
        for _ in range(3)
    ]  # fmt: skip
    ha = HaRedis(logdir, servers, sentinels)
    try:
        ha.wait_ready()
    except BaseException:
        ha.close()
        raise
    return ha
