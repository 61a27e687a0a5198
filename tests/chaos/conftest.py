"""A redis-server of the test's own (restartable, with AOF) for the Redis scenarios."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.stack import Proc, Stack, stack_for, start_redis


@dataclass
class OwnRedis:
    """A persistent redis-server that a test may stop, freeze and start again."""

    logdir: Path
    data_dir: Path
    proc: Proc

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.proc.port}/0"

    def restart(self) -> None:
        """Start it again on the same port and folder (after ``proc.stop()``)."""
        self.proc = start_redis(
            self.logdir, port=self.proc.port, data_dir=self.data_dir, persistent=True
        )


@pytest.fixture
def own_redis(logdir: Path, tmp_path: Path) -> Iterator[OwnRedis]:
    data = tmp_path / "redis"
    data.mkdir()
    own = OwnRedis(logdir, data, start_redis(logdir, data_dir=data, persistent=True))
    yield own
    own.proc.kill()


@pytest.fixture
def own_stack(
    own_redis: OwnRedis, sim: Proc, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    httpx.post(sim.url + "/sim/reset")
    with stack_for(request, own_redis.url, sim.url, logdir) as s:
        yield s
