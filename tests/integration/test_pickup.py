"""Pickup: a worker starts a job because it was woken, not because it polled.

WAKE_FALLBACK_S is 30 s in these tests, so a job that started within a few seconds was
started by a wake-up: the gateway's publish on ``llmq:wake``, or a slot freeing.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from tests.support.clients import assert_drained, body, release, wait_held
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration

FALLBACK_S = 30
WELL_BEFORE_FALLBACK_S = 10  # generous for a loaded CI machine, a third of the fallback


def test_an_idle_worker_is_woken_by_the_enqueue(stack: Stack, rdb: redis.Redis) -> None:
    stack.worker(max_active=1, wake_fallback_s=FALLBACK_S)
    gw = stack.gateway()
    for _ in range(3):  # each one finds the worker idle, waiting on its wake event
        resp = httpx.post(
            gw.url + "/v1/chat/completions", json=body(stream=False, tokens=1), timeout=60
        )
        assert resp.status_code == 200
        assert resp.json()["timings"]["queue_wait_ms"] < WELL_BEFORE_FALLBACK_S * 1000
    assert_drained(rdb)


def test_a_freed_slot_starts_the_queued_job(stack: Stack, rdb: redis.Redis, sim: Proc) -> None:
    stack.worker(max_active=1, wake_fallback_s=FALLBACK_S)
    gw = stack.gateway()

    async def run() -> float:
        async with httpx.AsyncClient(timeout=60) as c:
            url = gw.url + "/v1/chat/completions"
            first = asyncio.create_task(c.post(url, json=body(stream=False, hold="first")))
            await asyncio.to_thread(wait_held, sim.url, "first", 1)
            second = asyncio.create_task(c.post(url, json=body(stream=False, tokens=1)))
            await asyncio.to_thread(
                wait_for, lambda: rdb.zcard("llmq:queue") == 2, 10, "the second job queued"
            )
            released = time.monotonic()
            await asyncio.to_thread(release, sim.url, "first")
            assert (await first).status_code == 200
            resp = await second
            assert resp.status_code == 200
            return time.monotonic() - released

    # Nothing but the freed slot wakes the worker here: no enqueue, no abort after the release.
    assert asyncio.run(run()) < WELL_BEFORE_FALLBACK_S
    assert_drained(rdb)
