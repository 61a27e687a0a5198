"""Fixtures shared by the suites: one real redis-server and one engine simulator per session,
a fresh stack of gateway/worker processes per test (e2e overrides ``stack`` with vLLM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.support.stack import Proc, Stack, stack_for, start_redis, start_sim


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(logdir: Path) -> Iterator[Proc]:
    proc = start_redis(logdir)
    yield proc
    proc.kill()


@pytest.fixture
def sdk() -> Iterator[Callable[[str], openai.OpenAI]]:
    """openai SDK clients by gateway/engine base URL, closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(url: str, api_key: str = "unused") -> openai.OpenAI:
        clients.append(
            openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        )
        return clients[-1]

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def rdb(redis_server: Proc) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    yield client
    client.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


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
    with stack_for(request, f"redis://127.0.0.1:{redis_server.port}/0", sim.url, logdir) as s:
        yield s
