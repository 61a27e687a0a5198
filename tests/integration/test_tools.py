"""Tool calling: a worker learns from its engine whether it takes ``tools`` with
``tool_choice: "auto"`` and says so in its heartbeat; where it cannot, the gateway refuses
such a request with a 400 naming ``tools`` before anything is queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import body, sim_stats
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.integration

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def plain_sim(logdir: Path) -> Iterator[Proc]:
    """An engine without tool calling (as vLLM started without a tool-call parser)."""
    proc = start_sim(logdir, "--no-auto-tools", "--tokens", "4")
    yield proc
    proc.kill()


def heartbeat_says(rdb: Any, value: bytes) -> bool:
    """Every worker's heartbeat has ``auto_tools`` = ``value`` (``rdb``: typed Any, as
    redis-py's stubs say every reply may be awaitable)."""
    workers = [k for k in rdb.scan_iter("llmq:worker:*") if rdb.type(k) == b"hash"]
    return bool(workers) and all(rdb.hget(k, "auto_tools") == value for k in workers)


def chat(gw: Proc, **extra: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json={**body(stream=False), **extra})


def test_an_engine_without_tool_calling_gets_no_auto_tool_requests(
    stack: Stack, rdb: redis.Redis, plain_sim: Proc
) -> None:
    stack.engine_url = plain_sim.url
    stack.worker()
    wait_for(lambda: heartbeat_says(rdb, b"0"), 15, "the heartbeat to say no auto tools")
    gw = stack.gateway()  # its first view of the workers (before it serves) has the answer
    assert sim_stats(plain_sim.url)["probes"] == 1, "one probe, not a job"

    for auto in ({"tools": [TOOL]}, {"tools": [TOOL], "tool_choice": "auto"}):
        resp = chat(gw, **auto)
        assert resp.status_code == 400
        err = resp.json()["error"]
        assert err["param"] == "tools"
        assert "tool_choice" in err["message"]
    assert sim_stats(plain_sim.url)["requests"] == 0, "refused before anything was queued"
    assert rdb.zcard("llmq:queue") == 0

    # What such an engine does take: no tools, or another tool choice.
    for choice in (None, "none", "required"):
        other: dict[str, Any] = {} if choice is None else {"tools": [TOOL], "tool_choice": choice}
        assert chat(gw, **other).status_code == 200, other
    assert sim_stats(plain_sim.url)["requests"] == 3


def test_an_engine_with_tool_calling_is_sent_tools(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker()
    wait_for(lambda: heartbeat_says(rdb, b"1"), 15, "the heartbeat to say auto tools")
    gw = stack.gateway()
    resp = chat(gw, tools=[TOOL])
    assert resp.status_code == 200
    assert sim_stats(sim.url)["requests"] == 1
