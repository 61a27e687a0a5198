"""Fixtures: one real redis-server and one simulator per session; a fresh stack per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.integration.procs import Proc, Stack, start_redis, start_sim

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(logdir: Path) -> Iterator[Proc]:
    proc = start_redis(logdir)
    yield proc
    proc.kill()


@pytest.fixture(scope="session")
def sim(logdir: Path) -> Iterator[Proc]:
    proc = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5", "--tokens", "16")
    yield proc
    proc.kill()


@pytest.fixture
def rdb(redis_server: Proc) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def stack(
    redis_server: Proc, sim: Proc, rdb: redis.Redis, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    httpx.post(sim.url + "/sim/reset")
    s = Stack(f"redis://127.0.0.1:{redis_server.port}/0", sim.url, logdir)
    yield s
    s.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in s.procs:
            print(f"----- {p.name} log -----\n{p.output()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
