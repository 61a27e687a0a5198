"""A per-test stack of real gateway and worker processes (helpers in bench.processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import (
    ROOT,
    Proc,
    free_port,
    service_env,
    start_gateway,
    start_redis,
    start_sim,
    start_worker,
    wait_for,
)

__all__ = ["ROOT", "Proc", "Stack", "free_port", "start_redis", "start_sim", "wait_for"]


@dataclass
class Stack:
    """Gateways and workers against one Redis and one engine; killed at teardown."""

    redis_url: str
    engine_url: str
    logdir: Path
    procs: list[Proc] = field(default_factory=list)

    def worker(self, **settings: object) -> Proc:
        proc = start_worker(self.logdir, service_env(self.redis_url, self.engine_url, **settings))
        self.procs.append(proc)
        return proc

    def gateway(self, wait_ready: bool = True, **settings: object) -> Proc:
        env = service_env(self.redis_url, self.engine_url, **settings)
        proc = start_gateway(self.logdir, env, wait_ready=wait_ready)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
