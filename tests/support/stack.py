"""Per-test stacks of real processes, and the one place tests reach the process harness.

The harness itself (``bench.processes``: spawn, redis-server, simulator, gateway, worker,
vLLM; ``bench.ha``: a Sentinel-managed Redis) is shared with the benchmarks; tests import
it only through this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.ha import Answer, HaRedis, load_through_failover, start_ha_redis
from bench.processes import (
    BUNDLED_MODEL,
    EMBED_MODEL,
    ROOT,
    Proc,
    embed_model_dir,
    engine_paths,
    free_port,
    service_env,
    spawn,
    spawn_vllm,
    spawn_vllm_embedding,
    start_gateway,
    start_otlp_receiver,
    start_redis,
    start_sim,
    start_worker,
    wait_for,
)

E2E_MAX_MODEL_LEN = 512  # the e2e vLLM's context length: small, so overflow is cheap to test
E2E_SECOND_NAME = "smol-second"  # the e2e vLLM's second served name
E2E_ENGINE_KEY = "e2e-engine-key"  # the e2e vLLM needs it, as compose's does: workers send it

__all__ = [
    "BUNDLED_MODEL",
    "E2E_ENGINE_KEY",
    "E2E_MAX_MODEL_LEN",
    "E2E_SECOND_NAME",
    "EMBED_MODEL",
    "ROOT",
    "Answer",
    "HaRedis",
    "Proc",
    "Stack",
    "dump_logs_on_failure",
    "embed_model_dir",
    "engine_paths",
    "free_port",
    "load_through_failover",
    "spawn",
    "spawn_vllm",
    "spawn_vllm_embedding",
    "stack_for",
    "start_ha_redis",
    "start_otlp_receiver",
    "start_redis",
    "start_sim",
    "wait_for",
]


@dataclass
class Stack:
    """Gateways and workers against one Redis and one engine; killed at teardown."""

    redis_url: str
    engine_url: str
    logdir: Path
    procs: list[Proc] = field(default_factory=list)
    worker_settings: dict[str, object] = field(default_factory=dict)  # e.g. vllm_api_key

    def worker(self, **settings: object) -> Proc:
        env = service_env(self.redis_url, self.engine_url, **{**self.worker_settings, **settings})
        proc = start_worker(self.logdir, env)
        self.procs.append(proc)
        return proc

    def gateway(
        self, wait_ready: bool = True, wrapper: Sequence[str] = (), **settings: object
    ) -> Proc:
        env = service_env(self.redis_url, self.engine_url, **settings)
        proc = start_gateway(self.logdir, env, wait_ready=wait_ready, wrapper=wrapper)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@contextmanager
def stack_for(
    request: pytest.FixtureRequest, redis_url: str, engine_url: str, logdir: Path, **kw: Any
) -> Iterator[Stack]:
    """A fixture's Stack: killed at teardown, its processes' logs printed if the test failed."""
    s = Stack(redis_url, engine_url, logdir, **kw)
    try:
        yield s
    finally:
        s.close()
        dump_logs_on_failure(request, s.procs)


def dump_logs_on_failure(request: pytest.FixtureRequest, procs: list[Proc]) -> None:
    """Print the tail of every process log when the test's call phase failed."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in procs:
            print(f"----- {p.name} log -----\n{p.output()[-4000:]}")
