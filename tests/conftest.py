"""Fixtures shared by the integration and e2e suites: one real redis-server per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import redis

from tests.support.stack import Proc, start_redis


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

    def make(url: str) -> openai.OpenAI:
        clients.append(
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
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
