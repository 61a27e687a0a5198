"""Engine client against a fake engine: a real aiohttp server on loopback
(tests/support/fake_engine.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from llmq.shared.errors import EngineUnavailable, UpstreamError
from llmq.shared.protocol import JobSpec, ModelCard
from llmq.shared.settings import Settings
from llmq.worker.engine import EngineClient, engine_body
from llmq.worker.runtime import MAX_STREAM_INTERVAL, Runtime
from tests.support.clients import sse_bytes as sse
from tests.support.fake_engine import Handler, fake_engine
from tests.support.stack import free_port


@asynccontextmanager
async def client(handler: Handler) -> AsyncIterator[EngineClient]:
    async with fake_engine(handler) as url:
        c = EngineClient(url, max_connections=2)
        try:
            yield c
        finally:
            await c.aclose()


async def test_stream_yields_each_chunks_json_as_bytes() -> None:
    answer = httpx.Response(200, content=sse({"a": 1}, {"b": 2}))
    async with client(lambda r: answer) as c, c.stream({"stream": True}) as chunks:
        assert [x async for x in chunks] == [b'{"a": 1}', b'{"b": 2}']


async def test_refusal_keeps_vllm_status_and_message() -> None:
    body = {"error": {"message": "context too long", "type": "BadRequestError", "code": 400}}
    async with client(lambda r: httpx.Response(400, json=body)) as c:
        with pytest.raises(UpstreamError) as info:
            async with c.stream({}):
                pass
    assert info.value.status == 400
    assert info.value.message == "context too long"
    assert info.value.type == "BadRequestError"


async def test_old_flat_error_shape_and_non_json_bodies() -> None:
    flat = httpx.Response(422, json={"object": "error", "message": "bad"})
    async with client(lambda r: flat) as c:
        with pytest.raises(UpstreamError, match="bad"):
            await c.complete({})
    async with client(lambda r: httpx.Response(500, text="boom")) as c:
        with pytest.raises(UpstreamError, match="boom"):
            await c.complete({})


async def test_stream_without_done_is_an_error() -> None:
    async with client(lambda r: httpx.Response(200, content=sse({"a": 1}, done=False))) as c:
        with pytest.raises(UpstreamError, match=r"\[DONE\]"):
            async with c.stream({}) as chunks:
                [x async for x in chunks]


async def test_error_inside_the_stream_is_raised() -> None:
    failing = httpx.Response(200, content=sse({"error": {"message": "oom", "code": 500}}))
    async with client(lambda r: failing) as c:
        with pytest.raises(UpstreamError, match="oom"):
            async with c.stream({}) as chunks:
                [x async for x in chunks]


async def test_unreachable_engine_is_unavailable() -> None:
    c = EngineClient(f"http://127.0.0.1:{free_port()}", max_connections=2)  # nothing listens
    try:
        with pytest.raises(EngineUnavailable):
            await c.complete({})
        with pytest.raises(EngineUnavailable):
            async with c.stream({}):
                pass
        assert await c.models() is None
    finally:
        await c.aclose()


async def test_models_lists_ids_context_lengths_owners_and_adapter_parents() -> None:
    data = {
        "data": [
            {"id": "m1", "max_model_len": 2048, "owned_by": "vllm", "parent": None},
            {"id": "m2"},
            {"id": "sql-lora", "owned_by": "vllm", "parent": "m1", "root": "/adapters/sql"},
        ]
    }
    async with client(lambda r: httpx.Response(200, json=data)) as c:
        assert await c.models() == [
            ModelCard(id="m1", owned_by="vllm", max_model_len=2048),
            ModelCard(id="m2"),
            ModelCard(id="sql-lora", owned_by="vllm", parent="m1"),
        ]


async def test_the_api_key_is_sent() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json={"data": []})

    async with fake_engine(handler) as url:
        c = EngineClient(url, max_connections=2, api_key="k-123")
        await c.models()
        await c.aclose()
    assert seen == ["Bearer k-123"]


def _spec(stream: bool) -> JobSpec:
    return JobSpec(
        id="j", model="m", stream=stream, include_usage=False, enqueued_at_ms=0, body={"x": 1}
    )


def test_the_engine_body_carries_a_stream_interval_only_when_it_batches() -> None:
    assert engine_body(_spec(True), False) == {"x": 1}
    assert engine_body(_spec(True), False, 4) == {"x": 1, "stream_interval": 4}
    assert engine_body(_spec(False), False, 4) == {"x": 1}, "not streamed: nothing to batch"
    assert engine_body(_spec(True), True, 1) == {"x": 1, "priority": 1}  # the normal band


def _runtime(**settings: Any) -> Runtime:
    return Runtime(
        settings=Settings(**settings),
        store=None,  # type: ignore[arg-type]
        batches=None,  # type: ignore[arg-type]
        engine=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
        outbox=None,  # type: ignore[arg-type]
    )


def test_a_busy_worker_asks_for_the_tokens_the_engine_makes_in_a_frame() -> None:
    rt = _runtime(stream_frame_ms=20, stream_batch_from=16)
    rt.active = 16
    assert rt.stream_interval() == 1, "the engine's pace is not known yet"
    rt.observe_itl(0.005)
    assert rt.stream_interval() == 4  # 20 ms at 5 ms a token
    rt.active = 15
    assert rt.stream_interval() == 1, "not busy"
    rt.active = 64
    rt.observe_itl(0.05)  # slower: the EWMA moves a fifth of the way
    assert rt.itl_s == pytest.approx(0.014)
    assert rt.stream_interval() == 1
    rt.itl_s = 0.0001
    assert rt.stream_interval() == MAX_STREAM_INTERVAL
    assert _runtime(stream_frame_ms=0).stream_interval() == 1
