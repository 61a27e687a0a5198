"""A Sentinel-managed Redis on loopback, for the failover tests and ``bench.failover``: a
primary, a replica and three sentinels (quorum 2, ``down-after-milliseconds`` 2000)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.processes import Proc, start_redis, start_sentinel, wait_for
from local.launch import SENTINEL_MASTER


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

    def env(self) -> dict[str, object]:
        """The services' settings: REDIS_URL names no server (Sentinel decides)."""
        return {"redis_url": "redis://127.0.0.1:1/0", "redis_sentinels": self.sentinels_setting}

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
            if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < 1:
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


def start_ha_redis(logdir: Path, *, down_after_ms: int = 2000) -> HaRedis:
    primary = start_redis(logdir)
    replica = start_redis(logdir, replica_of=primary.port)
    sentinels = [start_sentinel(logdir, primary.port, down_after_ms=down_after_ms)
                 for _ in range(3)]  # fmt: skip
    ha = HaRedis(logdir, {primary.port: primary, replica.port: replica}, sentinels)
    try:
        ha.wait_ready()
    except BaseException:
        ha.close()
        raise
    return ha
