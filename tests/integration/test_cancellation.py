"""Cancellation and timeouts: nothing runs for a client that left; no slot leaks."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import redis

from tests.support.clients import (
    assert_drained,
    body,
    release,
    sim_stats,
    stream_chat,
    wait_held,
)
from tests.support.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def test_disconnect_while_running_aborts_engine_and_frees_slot(
    stack: Stack, rdb: redis.Redis, sim
) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway()

    async def read_three_chunks_then_leave() -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            r = await stream_chat(
                c, gw.url, body(tokens=20, hold="left", hold_after=3), max_chunks=3
            )
        assert r.status == 200
        assert len(r.chunks) == 3

    asyncio.run(read_three_chunks_then_leave())
    wait_for(
        lambda: sim_stats(sim.url)["streams_abandoned"] == 1,
        10,
        "the engine to see its stream abandoned",
    )
    assert sim_stats(sim.url)["streams_completed"] == 0
    assert_drained(rdb, within=10)
    # The single slot is free again: a new request is served at once.
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body(stream=False, tokens=2))
    assert resp.status_code == 200


def test_disconnect_while_queued_job_never_runs(stack: Stack, rdb: redis.Redis, sim) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway()
    blocker = threading.Thread(
        target=lambda: httpx.post(
            gw.url + "/v1/chat/completions",
            json=body(stream=False, tokens=1, hold="blocker"),
            timeout=60,
        ),
        daemon=True,
    )
    blocker.start()
    wait_held(sim.url, "blocker", 1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.url + "/v1/chat/completions",
            json=body(stream=False, tokens=1),
            timeout=httpx.Timeout(5, read=0.5),
        )
    wait_for(lambda: rdb.zcard("llmq:queue") == 1, 10, "the queued job to be removed")
    release(sim.url, "blocker")
    blocker.join(30)
    wait_for(lambda: rdb.zcard("llmq:queue") == 0, 10, "queue empty")
    assert sim_stats(sim.url)["requests"] == 1, "the cancelled job reached the engine"
    assert_drained(rdb)


def test_request_timeout_mid_stream_is_one_error_event(stack: Stack, rdb: redis.Redis) -> None:
    stack.worker(max_active=1, request_timeout_s=1)
    gw = stack.gateway(request_timeout_s=1)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            # The engine sends three tokens, then nothing until REQUEST_TIMEOUT_S ends it.
            r = await stream_chat(c, gw.url, body(tokens=50, hold="slow", hold_after=3))
        assert r.status == 200
        assert r.done
        assert r.text == "tok0 tok1 tok2 "
        assert [e["code"] for e in r.sse_errors] == ["request_timeout"]
        assert len(r.chunks) == 4
        assert "error" in r.chunks[-1]

    asyncio.run(run())
    assert_drained(rdb, within=10)


def test_request_timeout_non_streaming_is_504(stack: Stack) -> None:
    stack.worker(request_timeout_s=1)
    gw = stack.gateway(request_timeout_s=1)
    resp = httpx.post(
        gw.url + "/v1/chat/completions", json=body(stream=False, hold="never"), timeout=30
    )
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "request_timeout"


def test_engine_drop_mid_stream_is_one_error_event(stack: Stack) -> None:
    stack.worker()
    gw = stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await stream_chat(c, gw.url, body(tokens=20, drop_after=3))
        assert r.status == 200
        assert r.done
        assert r.text == "tok0 tok1 tok2 "
        assert len(r.sse_errors) == 1
        assert r.sse_errors[0]["code"] == "engine_stream_broken"

    asyncio.run(run())
