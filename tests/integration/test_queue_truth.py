"""The queue tells the truth, on real Redis and processes with simulator holds: a request that
cannot start within QUEUE_TIMEOUT_S is refused at once, Retry-After says when a slot frees,
a full queue gives the most-queued key's newest place to another key, and a waiting client
sees its position and ETA."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import admitted, assert_drained, body, new_key, release, wait_held
from tests.support.stack import Stack, wait_for

pytestmark = pytest.mark.integration

URL = "/v1/chat/completions"
# A job of the simulator that holds its slot about 3 s (30 tokens, 100 ms apart).
SLOW: dict[str, Any] = {"tokens": 30, "itl_ms": 100}


def learn_service_time(rdb: redis.Redis, url: str, headers: dict[str, str] | None = None) -> float:
    """Run one slow job to completion: the model's service time becomes ~3 s (what jobs
    before it took is forgotten first: the first sample is taken as it is)."""
    rdb.delete("llmq:model:sim-model:service")
    resp = httpx.post(url + URL, json=body(stream=False, **SLOW), headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    wait_for(lambda: rdb.hget("llmq:model:sim-model:service", "ms") is not None, 10, "service")
    ms = int(rdb.hget("llmq:model:sim-model:service", "ms") or 0)  # type: ignore[arg-type]
    assert 2500 <= ms <= 6000, ms
    return ms / 1000


def wait_admitted(rdb: redis.Redis, n: int) -> None:
    wait_for(lambda: admitted(rdb) == n, 10, f"{n} admitted")


def test_a_request_that_cannot_start_in_time_is_refused_at_once(
    stack: Stack, rdb: redis.Redis
) -> None:
    """One slot, QUEUE_TIMEOUT_S 2: with no service time known yet a request waits (and times
    out) as before; once one job took ~3 s, a request behind a running one is expected to
    wait ~3 s and is refused 503 queue_timeout at once, with Retry-After."""
    stack.worker(max_active=1)
    gw = stack.gateway(queue_timeout_s=2)

    async def behind_a_held_job(name: str) -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            held = asyncio.create_task(c.post(URL, json=body(stream=False, hold=name)))
            await asyncio.to_thread(wait_held, stack.engine_url, name, 1)
            started = time.monotonic()
            resp = await c.post(URL, json=body(stream=False))
            took = time.monotonic() - started
            release(stack.engine_url, name)
            assert (await held).status_code == 200
            return resp, took

    unknown, waited = asyncio.run(behind_a_held_job("first"))
    assert unknown.status_code == 503
    assert unknown.json()["error"]["code"] == "queue_timeout"
    assert waited >= 1.8, "no service time yet: admitted, and it timed out as before"

    learn_service_time(rdb, gw.url)
    refused, took = asyncio.run(behind_a_held_job("second"))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "queue_timeout"
    assert "expected wait" in refused.json()["error"]["message"]
    assert took < 1.0, f"refused after {took:.3f}s: not at once"
    assert 1 <= int(refused.headers["retry-after"]) <= 4
    assert_drained(rdb)


def test_retry_after_says_when_a_slot_frees(stack: Stack, rdb: redis.Redis) -> None:
    """Reject mode, one slot, jobs of ~3 s: a request refused 429 server_busy just after a job
    started is told to retry in about the time that job still runs (within ±50 %)."""
    stack.worker(max_active=1)
    gw = stack.gateway(queue_mode="reject")
    learn_service_time(rdb, gw.url)

    async def scenario() -> tuple[int, float]:
        async with (
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
            c.stream("POST", URL, json=body(stream=True, **SLOW)) as running,
        ):
            lines = running.aiter_lines()
            async for line in lines:  # its first token: the slot is taken
                if line.startswith("data: ") and '"content"' in line:
                    break
            refused = await c.post(URL, json=body(stream=False))
            t_refused = time.monotonic()
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "server_busy"
            async for _ in lines:  # the rest of the job: the slot frees at its end
                pass
            return int(refused.headers["retry-after"]), time.monotonic() - t_refused

    said, actual = asyncio.run(scenario())
    assert abs(said - actual) <= 0.5 * actual + 0.5, (said, actual)
    assert_drained(rdb)


def test_a_full_queue_gives_the_most_queued_keys_newest_place_to_another_key(
    stack: Stack, rdb: redis.Redis
) -> None:
    """One slot, QUEUE_MAX 3: key A runs one job and fills the three queue places; key B's
    request is admitted anyway: A's newest waiting job gives its place (429 queue_full with
    Retry-After), and everything else completes once the engine goes on."""
    stack.worker(max_active=1)
    gw = stack.gateway(auth="keys", queue_max=3)
    a = {"Authorization": f"Bearer {new_key(stack, 'a')}"}
    b = {"Authorization": f"Bearer {new_key(stack, 'b')}"}

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            first = asyncio.create_task(c.post(URL, json=body(stream=False, hold="a"), headers=a))
            await asyncio.to_thread(wait_held, stack.engine_url, "a", 1)
            queued = []
            for i in range(3):
                queued.append(asyncio.create_task(c.post(URL, json=body(stream=False), headers=a)))
                await asyncio.to_thread(wait_admitted, rdb, i + 2)
            newest = queued[-1]
            other = asyncio.create_task(c.post(URL, json=body(stream=False), headers=b))
            displaced = await asyncio.wait_for(newest, 10)
            release(stack.engine_url, "a")
            rest = [await first, *[await t for t in queued[:-1]]]
            return [*rest, displaced], await other

    responses, b_resp = asyncio.run(scenario())
    *served, displaced = responses
    assert displaced.status_code == 429, displaced.text
    assert displaced.json()["error"]["code"] == "queue_full"
    assert int(displaced.headers["retry-after"]) >= 1
    assert [r.status_code for r in served] == [200, 200, 200]
    assert b_resp.status_code == 200, "B got a place although A filled the queue"
    assert_drained(rdb)


def _comments(raw: list[str]) -> list[dict[str, int]]:
    out = []
    for line in raw:
        if line.startswith(": queued "):
            out.append({k: int(v) for k, v in (p.split("=") for p in line[9:].split())})
    return out


def test_a_waiting_stream_hears_its_position_and_eta(stack: Stack, rdb: redis.Redis) -> None:
    """X-Queue-Updates: true: a streamed request behind others gets `: queued position=<n>
    eta_ms=<ms>` comments, first at once, then at least every 2 s, positions falling as the
    jobs ahead end; the stored job's GET shows queue_position and eta_ms meanwhile. Without
    the header no comment is sent."""
    stack.worker(max_active=1)
    gw = stack.gateway(queue_timeout_s=60)
    learn_service_time(rdb, gw.url)

    async def scenario() -> tuple[list[str], list[dict[str, Any]], list[str]]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            ahead = [asyncio.create_task(c.post(URL, json=body(stream=False, hold="h")))]
            await asyncio.to_thread(wait_held, stack.engine_url, "h", 1)
            for _ in range(2):  # two more waiting, ~3 s each once running
                ahead.append(asyncio.create_task(c.post(URL, json=body(stream=False, **SLOW))))
            await asyncio.to_thread(wait_for, lambda: admitted(rdb) == 3, 10, "three admitted")
            lines: list[str] = []
            polled: list[dict[str, Any]] = []
            req = {**body(stream=True), "store": True}
            headers = {"X-Queue-Updates": "true"}
            async with c.stream("POST", URL, json=req, headers=headers) as resp:
                assert resp.status_code == 200
                job_id = resp.headers["x-request-id"]
                released = False
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if line.startswith(": queued") and not released:
                        got = await c.get(f"{URL}/{job_id}")
                        polled.append(got.json())
                        release(stack.engine_url, "h")
                        released = True
            for t in ahead:
                assert (await t).status_code == 200
            plain: list[str] = []
            async with c.stream("POST", URL, json=body(stream=True)) as resp:
                plain = [line async for line in resp.aiter_lines()]
            return lines, polled, plain

    lines, polled, plain = asyncio.run(scenario())
    updates = _comments(lines)
    assert len(updates) >= 2, lines[:10]
    positions = [u["position"] for u in updates]
    assert positions[0] == 3, "behind the running job and two waiting ones"
    assert positions == sorted(positions, reverse=True)
    assert positions[-1] < positions[0]
    assert all(u["eta_ms"] >= 0 for u in updates)
    assert 3000 <= updates[0]["eta_ms"] <= 20_000, updates[0]
    assert polled[0]["queue_position"] >= 1
    assert polled[0]["eta_ms"] >= 0
    assert any(line.startswith("data: ") and '"content"' in line for line in lines)
    assert not any(line.startswith(":") for line in plain), "no comments without the header"
    json.dumps(polled)
    assert_drained(rdb)
