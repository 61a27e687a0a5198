"""The package is the Redis contract: nothing outside ``llmq/shared/queue/`` issues a Redis
command (the pub/sub reading loops of the gateway and the worker's wake listener aside:
they SUBSCRIBE on a connection the package builds and read it with ``queue.pubsub``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
PACKAGE = ROOT / "llmq/shared/queue"
# A command on a client (``redis.get(``, ``self.redis.zadd(``, ``store.redis.ping(``) or a
# pipeline or script of one. Creating a pub/sub reader and closing a client are not commands.
_COMMAND = re.compile(
    r"\bredis\.(?!asyncio\b|exceptions\b|pubsub\(|aclose\(|from_pool\(|Redis\b)\w+\("
    r"|\.pipeline\(|\.register_script\("
)


def _commands_outside() -> list[str]:
    found = []
    for file in (ROOT / "llmq").rglob("*.py"):
        if PACKAGE in file.parents:
            continue
        for n, line in enumerate(file.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _COMMAND.search(code):
                found.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    return found


def test_no_redis_command_outside_the_package() -> None:
    assert _commands_outside() == []


def test_the_check_sees_a_command() -> None:
    for line in ("await st.redis.ping()", "await self.redis.hget(k, f)", "r.pipeline()"):
        assert _COMMAND.search(line), line
    for line in ("redis.pubsub()", "await st.redis.aclose()", "from redis.asyncio import Redis"):
        assert not _COMMAND.search(line), line
