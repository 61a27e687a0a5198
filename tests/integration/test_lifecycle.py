"""Process lifecycle: drain on SIGTERM, a killed gateway loses no queued job, bad config."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading

import httpx
import pytest
import redis

from llmq.shared.sealing import new_key
from tests.support.clients import (
    admitted,
    assert_drained,
    body,
    get_json,
    members,
    release,
    stream_chat,
    wait_held,
)
from tests.support.stack import ROOT, Proc, Stack, wait_for

pytestmark = pytest.mark.integration


def test_sigterm_drains_running_and_queued_requests(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway(drain_timeout_s=60)

    def draining() -> bool:
        return bool(httpx.get(gw.url + "/health").json()["draining"])

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            streams = [
                asyncio.create_task(stream_chat(c, gw.url, body(tokens=8, hold="drain")))
                for _ in range(3)
            ]
            await asyncio.to_thread(wait_held, sim.url, "drain", 1)  # one runs, two queued
            await asyncio.to_thread(wait_for, lambda: admitted(rdb) == 3, 10, "three jobs admitted")
            gw.signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, draining, 10, "the gateway to drain")
            late = await c.post(gw.url + "/v1/chat/completions", json=body())
            assert late.status_code == 503
            assert late.json()["error"]["code"] == "shutting_down"
            assert late.headers["retry-after"]
            await asyncio.to_thread(release, sim.url, "drain")
            results = await asyncio.gather(*streams)
        for r in results:
            assert r.status == 200
            assert r.done
            assert len(r.chunks) == 9
            assert not r.sse_errors

    asyncio.run(run())
    assert gw.popen.wait(10) == 0


def test_worker_sigterm_finishes_running_jobs_and_withdraws_capacity(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    worker = stack.worker(max_active=2, drain_timeout_s=60)
    gw = stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            stream = asyncio.create_task(stream_chat(c, gw.url, body(tokens=20, hold="stop")))
            await asyncio.to_thread(wait_held, sim.url, "stop", 1)
            worker.signal(signal.SIGTERM)
            await asyncio.to_thread(
                wait_for,
                lambda: rdb.zcard("llmq:workers") == 0,
                10,
                "the worker to withdraw its heartbeat",
            )
            assert worker.alive(), "the running job holds the worker"
            await asyncio.to_thread(release, sim.url, "stop")
            result = await stream
        assert result.status == 200
        assert result.done
        assert len(result.chunks) == 21
        assert not result.sse_errors

    asyncio.run(run())
    assert worker.popen.wait(20) == 0
    wait_for(lambda: httpx.get(gw.url + "/health").status_code == 503, 10, "gateway sees no worker")
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body())
    assert resp.json()["error"]["code"] == "engine_unavailable"
    assert_drained(rdb)


def test_killed_gateway_leaves_queued_jobs_to_be_served(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway()
    clients = [
        threading.Thread(
            target=lambda: _quietly_post(gw.url, body(tokens=8, hold="gone")), daemon=True
        )
        for _ in range(4)
    ]
    for t in clients:
        t.start()
    wait_for(lambda: rdb.zcard("llmq:queue") == 4, 10, "four jobs in Redis")
    wait_held(sim.url, "gone", 1)
    ids = members(rdb, "llmq:queue")
    gw.kill()
    release(sim.url, "gone")

    def all_completed() -> bool:
        results = [rdb.get("llmq:outcome:" + i) for i in ids]
        return all(results)

    wait_for(all_completed, 30, "every queued job to be served")
    outcomes = [get_json(rdb, "llmq:outcome:" + i)["outcome"] for i in ids]
    assert outcomes == ["completed"] * 4
    restarted = stack.gateway()
    resp = httpx.post(restarted.url + "/v1/chat/completions", json=body(stream=False, tokens=1))
    assert resp.status_code == 200
    assert_drained(rdb)


def _quietly_post(url: str, payload: dict[str, object]) -> None:
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=30) as r:
            for _ in r.iter_lines():
                pass
    except httpx.HTTPError:
        pass  # the gateway was killed under us: that is the point of the test


@pytest.mark.parametrize("module", ["llmq.gateway", "llmq.worker"])
def test_startup_without_payload_keys_or_with_a_malformed_one_is_refused(module: str) -> None:
    """No PAYLOAD_KEYS: refused (clear payloads are PAYLOAD_KEYS=none, a choice). A malformed
    key: refused naming its position, never printing any key."""

    def start(keys: str | None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin"} | ({} if keys is None else {"PAYLOAD_KEYS": keys})
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
        )

    missing = start(None)
    assert missing.returncode != 0
    assert "PAYLOAD_KEYS is not set" in missing.stderr
    good, bad = new_key(), "c2VjcmV0LWJ1dC10b28tc2hvcnQ"
    malformed = start(f"{good},{bad}")
    assert malformed.returncode != 0
    assert "PAYLOAD_KEYS" in malformed.stderr
    assert "key 2 of 2" in malformed.stderr
    assert good not in malformed.stdout + malformed.stderr
    assert bad not in malformed.stdout + malformed.stderr


@pytest.mark.parametrize(
    ("var", "value"),
    [("QUEUE_MODE", "sometimes"), ("MAX_ACTIVE", "0"), ("QUEUE_TIMEOUT_S", "soon")],
)
@pytest.mark.parametrize("module", ["llmq.gateway", "llmq.worker"])
def test_invalid_setting_stops_startup_naming_the_variable(
    module: str, var: str, value: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env={"PATH": "/usr/bin:/bin", var: value},
    )
    assert proc.returncode != 0
    assert var in proc.stderr
    assert "invalid configuration" in proc.stderr
