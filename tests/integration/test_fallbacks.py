"""MODEL_FALLBACKS on real processes: a model's requests go to its fallback while its only
worker is gone or its queue is full, and back to it when it can take them again."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.clients import assert_drained, body, release, wait_held
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.integration

URL = "/v1/chat/completions"
FALLBACKS = '{"sim-model": ["small-model"]}'


@pytest.fixture
def small(logdir: Path) -> Iterator[Proc]:
    """A second engine, serving another model."""
    proc = start_sim(logdir, "--model", "small-model", "--ttft-ms", "5", "--itl-ms", "2")
    yield proc
    proc.kill()


def served_by(gw: Proc) -> tuple[int, str, str]:
    """(status, the answer's model, the fallback header) of one small request."""
    r = httpx.post(gw.url + URL, json=body(stream=False, tokens=2), timeout=30)
    model = r.json().get("model", "") if r.status_code == 200 else r.json()["error"]["code"]
    return r.status_code, model, r.headers.get("x-llmq-fallback", "")


def slots(gw: Proc) -> int:
    return int(httpx.get(gw.url + "/health").json()["models"].get("sim-model", 0))


def fallbacks_counted(gw: Proc, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith("api_model_fallbacks_total{") and f'reason="{reason}"' in line:
            assert 'requested="sim-model"' in line
            assert 'served="small-model"' in line
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_gone_model_falls_back_and_comes_back(stack: Stack, small: Proc) -> None:
    own = stack.worker()
    stack.worker(vllm_url=small.url)
    gws = [stack.gateway(model_fallbacks=FALLBACKS) for _ in range(2)]
    wait_for(lambda: all(served_by(gw)[1] == "sim-model" for gw in gws), 30, "both models served")
    assert served_by(gws[0]) == (200, "sim-model", ""), "its own model while it can"

    own.signal(signal.SIGKILL)  # its only worker: gone once its heartbeat expires
    wait_for(lambda: all(slots(gw) == 0 for gw in gws), 30, "the gateways to see it gone")
    for gw in gws:
        assert served_by(gw) == (200, "small-model", "sim-model -> small-model")
    assert fallbacks_counted(gws[1], "unavailable") >= 1

    stack.worker()  # back: each gateway sees it at its next read of the heartbeats
    wait_for(lambda: all(slots(gw) > 0 for gw in gws), 30, "the gateways to see it back")
    for gw in gws:
        assert served_by(gw) == (200, "sim-model", "")


def test_a_full_queue_falls_back_and_nothing_falls_back_when_the_request_is_at_fault(
    stack: Stack, rdb: redis.Redis, sim: Proc, small: Proc
) -> None:
    stack.worker(max_active=1)
    stack.worker(vllm_url=small.url)
    gw = stack.gateway(
        model_fallbacks=FALLBACKS, queue_max_per_model='{"sim-model": 0}', queue_max=16
    )
    wait_for(lambda: served_by(gw)[0] == 200, 30, "the gateway to see both models")

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            busy = asyncio.create_task(c.post(gw.url + URL, json=body(stream=False, hold="b")))
            await asyncio.to_thread(wait_held, sim.url, "b", 1)
            sent_on = await c.post(gw.url + URL, json=body(stream=True, tokens=3))
            assert sent_on.status_code == 200
            assert sent_on.headers["x-llmq-fallback"] == "sim-model -> small-model"
            assert '"model":"small-model"' in sent_on.text.replace(" ", "")
            # Too long for any context: its own refusal, not another model's.
            too_long = await c.post(gw.url + URL, json={**body(stream=False), "max_tokens": 10**6})
            assert too_long.status_code == 400
            assert "x-llmq-fallback" not in too_long.headers
            await asyncio.to_thread(release, sim.url, "b")
            assert (await busy).status_code == 200

    asyncio.run(run())
    assert fallbacks_counted(gw, "busy") == 1
    assert_drained(rdb)
