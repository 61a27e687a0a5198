"""A gateway or the engine killed mid-stream, and a client that never reads: the GPU's slot
is given back, the client (if still there) gets one error event and ``[DONE]``."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

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
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.chaos

BOUND_S = 30  # generous for a loaded 2-core machine; bench.chaos reports real figures


def test_gateway_killed_mid_stream_stops_its_orphaned_job(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1, orphan_grace_s=1)
    gw = stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            stream = asyncio.create_task(
                stream_chat(c, gw.url, body(tokens=2000, itl_ms=20, hold="g"))
            )
            await asyncio.to_thread(wait_held, sim.url, "g", 1)
            gw.popen.send_signal(signal.SIGKILL)
            release(sim.url, "g")
            with pytest.raises(httpx.HTTPError):
                await stream  # the connection died with the gateway

    asyncio.run(run())
    # 2000 tokens x 20 ms would take 40 s: the worker stops the job once nobody listens.
    wait_for(lambda: sim_stats(sim.url)["streams_abandoned"] == 1, BOUND_S, "the job stopped")
    assert sim_stats(sim.url)["streams_completed"] == 0
    assert_drained(rdb, within=BOUND_S)


@pytest.fixture
def own_sim(logdir: Path) -> Iterator[Proc]:
    proc = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "5")
    yield proc
    proc.kill()


def test_engine_killed_mid_stream_is_one_error_event(
    redis_server: Proc, rdb: redis.Redis, own_sim: Proc, logdir: Path
) -> None:
    stack = Stack(f"redis://127.0.0.1:{redis_server.port}/0", own_sim.url, logdir)
    try:
        stack.worker(max_active=1)
        gw = stack.gateway()

        async def run() -> None:
            async with httpx.AsyncClient(timeout=60) as c:
                stream = asyncio.create_task(
                    stream_chat(c, gw.url, body(tokens=20, hold="e", hold_after=2))
                )
                await asyncio.to_thread(wait_held, own_sim.url, "e", 1)
                own_sim.kill()
                r = await asyncio.wait_for(stream, BOUND_S)
            assert r.status == 200
            assert r.done
            assert r.text == "tok0 tok1 "
            assert [e["code"] for e in r.sse_errors] == ["engine_stream_broken"]

        asyncio.run(run())
        assert_drained(rdb, within=BOUND_S)
        wait_for(
            lambda: httpx.get(gw.url + "/health").status_code == 503,
            BOUND_S,
            "the gateway to see no ready engine",
        )
        resp = httpx.post(gw.url + "/v1/chat/completions", json=body())
        assert resp.json()["error"]["code"] == "engine_unavailable"
    finally:
        stack.close()


def test_client_that_never_reads_gives_its_slot_back(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1, orphan_grace_s=1)
    gw = stack.gateway(client_send_timeout_s=2)
    payload = json.dumps(body(tokens=4000, itl_ms=1, pad=8000)).encode()
    host, port = "127.0.0.1", int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port)) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        # ~32 MB of tokens for a client reading nothing: the job must stop long before.
        wait_for(lambda: sim_stats(sim.url)["streams_abandoned"] == 1, BOUND_S, "the job stopped")
        assert sim_stats(sim.url)["streams_completed"] == 0
        assert_drained(rdb, within=BOUND_S)
        ok = httpx.post(gw.url + "/v1/chat/completions", json=body(stream=False, tokens=1))
        assert ok.status_code == 200, "the freed slot serves the next client"
