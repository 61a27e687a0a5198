"""Backpressure with real Redis: the bound holds across two gateways bursting at once."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import redis

from tests.support.clients import (
    assert_drained,
    body,
    get_json,
    members,
    release,
    sim_stats,
    stream_chat,
    wait_held,
)
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration


async def _burst(
    urls: list[str], per_gateway: int, code: str, sim_url: str, admitted: int
) -> list[int]:
    """Burst at every gateway while the admitted jobs are held in the engine or queued, so
    none ends (and frees its place) before every request has been answered or admitted."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
        tasks = [
            asyncio.create_task(stream_chat(c, url, body(tokens=3, hold="burst")))
            for url in urls
            for _ in range(per_gateway)
        ]
        total = len(tasks)
        await asyncio.to_thread(
            wait_for,
            lambda: sum(t.done() for t in tasks) == total - admitted,
            30,
            f"{total - admitted} refusals",
        )
        await asyncio.to_thread(release, sim_url, "burst")
        results = await asyncio.gather(*tasks)
    for r in results:
        if r.status == 429:
            assert r.headers.get("retry-after"), "every 429 carries Retry-After"
            assert r.error_body is not None
            assert r.error_body["error"]["code"] == code
        else:
            assert r.status == 200, r
            assert r.done, r
    return [r.status for r in results]


@pytest.mark.parametrize(
    ("mode", "code", "expected"), [("queue", "queue_full", 2 + 3), ("reject", "server_busy", 2)]
)
def test_burst_from_two_gateways_admits_exactly_the_bound(
    stack: Stack, rdb: redis.Redis, sim: Proc, mode: str, code: str, expected: int
) -> None:
    stack.worker(max_active=2)
    gws = [stack.gateway(queue_mode=mode, queue_max=3) for _ in range(2)]
    statuses = asyncio.run(_burst([g.url for g in gws], 8, code, sim.url, expected))
    assert statuses.count(200) == expected
    assert statuses.count(429) == 16 - expected
    assert_drained(rdb)


def _background(url: str, payload: dict[str, object]) -> threading.Thread:
    t = threading.Thread(
        target=lambda: httpx.post(url + "/v1/chat/completions", json=payload, timeout=60),
        daemon=True,
    )
    t.start()
    return t


def test_queue_timeout_never_reaches_the_engine(stack: Stack, rdb: redis.Redis, sim: Proc) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway(queue_timeout_s=1)
    first = _background(gw.url, body(stream=False, tokens=1, hold="first"))
    wait_held(sim.url, "first", 1)
    t0 = time.monotonic()
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body(stream=False), timeout=30)
    waited = time.monotonic() - t0
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "queue_timeout"
    assert resp.headers["retry-after"]
    assert waited >= 1.0, "QUEUE_TIMEOUT_S=1: not given up before"
    release(sim.url, "first")
    first.join(30)
    assert sim_stats(sim.url)["requests"] == 1, "the timed-out job must never reach the engine"
    assert_drained(rdb)


def test_queued_job_payload_is_readable_json_with_its_body_sealed(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    """An operator reads a queued job's metadata in redis-cli; its request is ciphertext."""
    stack.worker(max_active=1)
    gw = stack.gateway()
    first = _background(gw.url, body(stream=False, tokens=1, hold="first"))
    wait_held(sim.url, "first", 1)
    second = _background(gw.url, body(stream=False, tokens=1))
    wait_for(lambda: rdb.zcard("llmq:queue") == 2, 10, "second job queued")
    waiting = [j for j in members(rdb, "llmq:queue") if not rdb.exists("arq:in-progress:" + j)]
    assert len(waiting) == 1
    job = get_json(rdb, "arq:job:" + waiting[0])
    assert job["f"] == "chat"
    spec = job["a"][0]
    assert spec["id"] == waiting[0]
    assert spec["model"] == "sim-model"
    assert spec["body"] == {}
    assert spec["sealed"].startswith("~1")
    assert b"hello there" not in rdb.get("arq:job:" + waiting[0])  # type: ignore[operator]
    release(sim.url, "first")
    first.join(30)
    second.join(30)
    assert_drained(rdb)
