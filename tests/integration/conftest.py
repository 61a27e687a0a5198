"""Fixtures: the engine simulator per session; a fresh stack of processes per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.stack import Proc, Stack, dump_logs_on_failure, start_sim


@pytest.fixture(scope="session")
def sim(logdir: Path) -> Iterator[Proc]:
    proc = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5", "--tokens", "16")
    yield proc
    proc.kill()


@pytest.fixture
def stack(
    redis_server: Proc, sim: Proc, rdb: redis.Redis, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    httpx.post(sim.url + "/sim/reset")
    s = Stack(f"redis://127.0.0.1:{redis_server.port}/0", sim.url, logdir)
    yield s
    s.close()
    dump_logs_on_failure(request, s.procs)
