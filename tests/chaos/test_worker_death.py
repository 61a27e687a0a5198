"""kill -9 of a worker mid-stream: clients are told in seconds, its places come back, queued
jobs run exactly once on the next worker, started ones never run again."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
import redis

from llmq.shared import sse
from tests.support.clients import (
    StreamResult,
    assert_drained,
    body,
    sim_stats,
    stream_chat,
    wait_held,
)
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.chaos

# Generous for a loaded 2-core machine; bench.chaos reports the real figures (about 3 s:
# the heartbeat TTL is three 1 s intervals).
CLIENT_TOLD_WITHIN_S = 15


def test_worker_killed_mid_stream(stack: Stack, rdb: redis.Redis, sim: Proc) -> None:
    victim = stack.worker(max_active=2)
    gw = stack.gateway()

    async def run() -> tuple[list[StreamResult], list[StreamResult], float]:
        async with httpx.AsyncClient(timeout=60) as c:
            streams = [
                asyncio.create_task(stream_chat(c, gw.url, body(tokens=20, hold="victim")))
                for _ in range(2)
            ]
            await asyncio.to_thread(wait_held, sim.url, "victim", 2)
            queued = [asyncio.create_task(stream_chat(c, gw.url, body(tokens=3))) for _ in range(2)]
            await asyncio.to_thread(
                wait_for, lambda: rdb.zcard("llmq:queue") == 4, 10, "two jobs queued"
            )
            victim.popen.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            lost = await asyncio.wait_for(asyncio.gather(*streams), CLIENT_TOLD_WITHIN_S)
            told_after = time.monotonic() - killed
            stack.worker(max_active=2)  # the replacement serves the queued ones
            served = await asyncio.gather(*queued)
        return list(lost), list(served), told_after

    lost, served, told_after = asyncio.run(run())
    assert told_after < CLIENT_TOLD_WITHIN_S
    for r in lost:
        assert r.status == 200
        assert r.done
        assert [e["code"] for e in r.sse_errors] == ["worker_lost"]
    for r in served:
        assert r.status == 200
        assert r.text == "tok0 tok1 tok2 "
    assert sim_stats(sim.url)["requests"] == 4, "each job reached the engine exactly once"
    assert_drained(rdb, within=10)
    assert rdb.keys("arq:in-progress:*") == []
    assert rdb.keys("llmq:worker-jobs:*") == []


def test_stored_job_of_a_killed_worker_is_failed_and_its_resume_ends(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    """A stored job whose worker dies: its record says failed, and a client resuming it (on
    a gateway that never saw it) gets the logged deltas, then worker_lost, then [DONE]."""
    victim = stack.worker(max_active=1)
    gw = stack.gateway()
    payload = {**body(tokens=20, hold="stored-victim", hold_after=3), "store": True}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            first = await stream_chat(c, gw.url, payload, max_chunks=2)
            job_id = first.chunks[0]["id"]
            await asyncio.to_thread(wait_held, sim.url, "stored-victim", 1)
            victim.popen.send_signal(signal.SIGKILL)
            url = f"{gw.url}/v1/chat/completions/{job_id}"
            await asyncio.to_thread(
                wait_for,
                lambda: httpx.get(url).json()["status"] == "failed",
                CLIENT_TOLD_WITHIN_S,
                "the stored job to be marked failed",
            )
            got = (await c.get(url)).json()
            assert got["error"]["code"] == "worker_lost"
            assert got["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
            again = await asyncio.wait_for(stream_chat_get(c, url), CLIENT_TOLD_WITHIN_S)
            assert again.text == "tok0 tok1 tok2 "
            assert [e["code"] for e in again.sse_errors] == ["worker_lost"]
            assert again.done

    asyncio.run(run())
    assert_drained(rdb, within=10)


async def stream_chat_get(c: httpx.AsyncClient, url: str) -> StreamResult:
    async with c.stream("GET", url, params={"stream": "true"}) as resp:
        out = StreamResult(resp.status_code, dict(resp.headers))
        async for chunk in sse.events(resp.aiter_lines()):
            out.chunks.append(chunk)
        out.done = True
        return out
