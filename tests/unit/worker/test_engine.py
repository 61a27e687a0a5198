"""Engine client against httpx.MockTransport (a fake at the seam)."""

from __future__ import annotations

import httpx
import pytest

from llmq.shared.errors import EngineUnavailable, UpstreamError
from llmq.worker.engine import EngineClient
from tests.support.clients import sse_bytes as sse


def client(handler) -> EngineClient:
    return EngineClient("http://engine", max_connections=2, transport=httpx.MockTransport(handler))


async def test_stream_yields_each_chunks_json_as_bytes() -> None:
    c = client(lambda r: httpx.Response(200, content=sse({"a": 1}, {"b": 2})))
    async with c.stream({"stream": True}) as chunks:
        assert [x async for x in chunks] == [b'{"a": 1}', b'{"b": 2}']


async def test_refusal_keeps_vllm_status_and_message() -> None:
    body = {"error": {"message": "context too long", "type": "BadRequestError", "code": 400}}
    c = client(lambda r: httpx.Response(400, json=body))
    with pytest.raises(UpstreamError) as info:
        async with c.stream({}):
            pass
    assert info.value.status == 400
    assert info.value.message == "context too long"
    assert info.value.type == "BadRequestError"


async def test_old_flat_error_shape_and_non_json_bodies() -> None:
    c = client(lambda r: httpx.Response(422, json={"object": "error", "message": "bad"}))
    with pytest.raises(UpstreamError, match="bad"):
        await c.complete({})
    c = client(lambda r: httpx.Response(500, text="boom"))
    with pytest.raises(UpstreamError, match="boom"):
        await c.complete({})


async def test_stream_without_done_is_an_error() -> None:
    c = client(lambda r: httpx.Response(200, content=sse({"a": 1}, done=False)))
    with pytest.raises(UpstreamError, match=r"\[DONE\]"):
        async with c.stream({}) as chunks:
            [x async for x in chunks]


async def test_error_inside_the_stream_is_raised() -> None:
    c = client(
        lambda r: httpx.Response(200, content=sse({"error": {"message": "oom", "code": 500}}))
    )
    with pytest.raises(UpstreamError, match="oom"):
        async with c.stream({}) as chunks:
            [x async for x in chunks]


async def test_unreachable_engine_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(EngineUnavailable):
        await client(refuse).complete({})
    assert await client(refuse).models() is None


async def test_models_lists_ids_and_context_lengths() -> None:
    data = {"data": [{"id": "m1", "max_model_len": 2048}, {"id": "m2"}]}
    c = client(lambda r: httpx.Response(200, json=data))
    assert await c.models() == [("m1", 2048), ("m2", 0)]
