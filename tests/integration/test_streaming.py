"""The happy path through real processes, with the official openai SDK as the client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import redis

from llmq.gateway import relay
from tests.support.clients import (
    MODEL,
    StreamResult,
    assert_drained,
    body,
    release,
    stream_chat,
    wait_held,
)
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration


def test_stream_with_usage_and_timings(stack: Stack, sdk) -> None:
    stack.worker(max_active=2)
    gw = stack.gateway()
    chunks = list(
        sdk(gw.url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"sim": {"tokens": 5}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens == 5
    timings = last.model_extra["timings"]
    assert timings["completion_tokens"] == 5
    assert 0 <= timings["queue_wait_ms"] <= timings["ttft_ms"] <= timings["total_ms"]


def test_stream_without_include_usage_hides_usage_chunk(stack: Stack, sdk) -> None:
    stack.worker()
    gw = stack.gateway()
    chunks = list(
        sdk(gw.url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"sim": {"tokens": 3}},
        )
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["timings"]["completion_tokens"] == 3


def test_non_streaming_exact_usage_and_request_id(stack: Stack, sdk) -> None:
    stack.worker()
    gw = stack.gateway()
    raw = sdk(gw.url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"] == completion.id
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    assert completion.model_extra["timings"]["completion_tokens"] == 4


def test_models_health_and_metrics(stack: Stack, rdb: redis.Redis, sdk) -> None:
    stack.worker(max_active=3)
    gw = stack.gateway()
    assert [m.id for m in sdk(gw.url).models.list().data] == [MODEL]
    health = httpx.get(gw.url + "/health")
    assert health.status_code == 200
    assert health.json()["capacity"] == 3
    assert health.json()["models"] == {MODEL: 3}, "capacity per model"
    assert health.headers["x-request-id"].startswith("req_")
    httpx.post(gw.url + "/v1/chat/completions", json=body(stream=False, tokens=2))
    assert httpx.get(gw.url + "/metrics").status_code == 404, "not on the public port"
    metrics = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
    assert (
        'api_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in metrics
    )
    for name in (
        "api_request_latency_seconds_bucket",
        "api_active_requests",
        "api_queue_depth",
        "api_time_to_first_token_seconds_bucket",
        "api_completion_tokens_total 2.0",
    ):
        assert name in metrics
    assert_drained(rdb)


def test_health_503_without_worker(stack: Stack, sdk) -> None:
    gw = stack.gateway(wait_ready=False)
    wait_for(lambda: httpx.get(gw.url + "/health").status_code == 503, 20, "gateway up")
    health = httpx.get(gw.url + "/health")
    assert health.json()["reason"] == "no live worker with a ready engine"
    assert "retry-after" in health.headers
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body())
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "engine_unavailable"
    assert resp.headers["retry-after"]


def _closed_connections_to(port: int) -> int:
    """Client sockets to ``port`` in TIME_WAIT (closed by this side), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == "06":  # TCP_TIME_WAIT
            count += 1
    return count


def test_the_worker_reuses_its_engine_connections(stack: Stack, sim: Proc) -> None:
    """Each job reads the engine's response to its end, so httpx keeps the connection:
    20 jobs one after another do not open (and close) 20 connections."""
    stack.worker()
    gw = stack.gateway()
    before = _closed_connections_to(sim.port)
    with httpx.Client(timeout=30) as client:
        for payload in [body(tokens=3), body(stream=False, tokens=3)] * 10:
            assert client.post(gw.url + "/v1/chat/completions", json=payload).status_code == 200
    assert _closed_connections_to(sim.port) - before <= 2


def test_many_streams_at_once_each_get_every_delta_in_order(stack: Stack, sim: Proc) -> None:
    """40 streams at once, past the load at which the gateway coalesces each stream's
    writes (relay.BUSY_STREAMS): all held after their first token until all 40 are live,
    then released together. Each gets every delta as its own event, numbered in order,
    exactly the engine's text, then [DONE]."""
    assert relay.BUSY_STREAMS <= 40
    stack.worker(max_active=40, stream_frame_ms=0)  # the engine's deltas one per token
    gw = stack.gateway()

    async def run() -> list[StreamResult]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as c:
            streams = [
                asyncio.create_task(stream_chat(c, gw.url, body(tokens=16, itl_ms=2, hold="many")))
                for _ in range(40)
            ]
            await asyncio.to_thread(wait_held, sim.url, "many", 40, 30)
            await asyncio.to_thread(release, sim.url, "many")
            return await asyncio.gather(*streams)

    expected = "".join(f"tok{i} " for i in range(16))
    for r in asyncio.run(run()):
        assert r.status == 200
        assert r.done
        assert r.text == expected
        deltas = [c for c in r.chunks if c.get("choices") and c["choices"][0].get("delta")]
        assert len(deltas) == 16, "one event per delta, however many shared a write"


def test_a_busy_worker_asks_the_engine_for_several_tokens_per_delta(stack: Stack) -> None:
    """Past STREAM_BATCH_FROM running jobs (1 here), a stream asks the engine for as many
    tokens per delta as it makes in STREAM_FRAME_MS (1 s at the simulator's 5 ms per token:
    16, the most asked). The first stream teaches the worker the engine's pace and
    gets one delta per token; the next gets the first token alone, then the rest in one
    delta: the same text and usage, numbered in order."""
    stack.worker(stream_batch_from=1, stream_frame_ms=1000)
    gw = stack.gateway()
    payload = {**body(tokens=16, itl_ms=5), "stream_options": {"include_usage": True}}

    async def run() -> list[StreamResult]:
        async with httpx.AsyncClient(timeout=60) as c:
            return [await stream_chat(c, gw.url, payload) for _ in range(2)]

    per_token, batched = asyncio.run(run())
    expected = "".join(f"tok{i} " for i in range(16))
    for r in (per_token, batched):
        assert r.text == expected
        assert r.done
        assert r.chunks[-1]["usage"]["completion_tokens"] == 16

    def contents(r: StreamResult) -> list[str]:
        return [
            c["choices"][0]["delta"]["content"]
            for c in r.chunks
            if c.get("choices") and c["choices"][0].get("delta", {}).get("content")
        ]

    assert len(contents(per_token)) == 16
    assert contents(batched) == ["tok0 ", "".join(f"tok{i} " for i in range(1, 16))]
