"""The job function on fakeredis with a mock engine: events, held final chunk, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from llmq.worker.engine import EngineClient
from llmq.worker.job import chat
from llmq.worker.metrics import WorkerMetrics
from llmq.worker.outbox import Outbox
from llmq.worker.runtime import RUNTIME, Runtime
from tests.support.clients import sse_bytes as sse
from tests.support.fake_engine import Handler, fake_engine


def chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "id": "engine-id",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE = {
    "id": "engine-id",
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


@asynccontextmanager
async def runtime(store: Store, handler: Handler, **settings: Any) -> AsyncIterator[Runtime]:
    async with fake_engine(handler) as url:
        engine = EngineClient(url, max_connections=2)
        try:
            yield Runtime(
                settings=Settings(**settings),
                store=store,
                batches=BatchStore(store.redis, 3600),
                engine=engine,
                metrics=WorkerMetrics(),
                outbox=Outbox(store),
            )
        finally:
            await engine.aclose()


def job(stream: bool = True) -> dict:
    return p.JobSpec(
        id="chatcmpl-x",
        model="m",
        stream=stream,
        include_usage=False,
        enqueued_at_ms=int(time.time() * 1000),
        body={},
    ).model_dump()


async def run_and_collect(store: Store, fake_redis, rt: Runtime, stream: bool = True):
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(names.events_channel("chatcmpl-x"))
    await pubsub.get_message(timeout=1)
    result = await chat({RUNTIME: rt}, job(stream))
    events = []
    while (msg := await pubsub.get_message(timeout=0.2)) is not None:
        events.extend(p.Event.decode_message(msg["data"]))
    await pubsub.aclose()
    return result, events


async def test_stream_publishes_numbered_chunks_and_holds_the_final_one(store, fake_redis):
    body = sse(chunk("a"), chunk("b"), chunk(finish="stop"), USAGE)
    async with runtime(store, lambda r: httpx.Response(200, content=body)) as rt:
        await store.jobs.admit(p.JobSpec.model_validate(job()), limit=5, hold_s=30, expire_s=30)
        result, events = await run_and_collect(store, fake_redis, rt)
        assert result == {"id": "chatcmpl-x", "outcome": "completed"}
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert [e.type for e in events] == [
            p.EventType.STARTED,
            p.EventType.CHUNK,
            p.EventType.CHUNK,
            p.EventType.DONE,
        ]
        assert json.loads(events[1].data)["id"] == "chatcmpl-x"  # the engine's id is replaced
        done = json.loads(events[3].data)
        assert done["final"]["choices"][0]["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] == 2
        assert await store.readings.in_system("m") == 0, "the job's place is released"
        assert rt.active == 0


async def test_engine_refusal_becomes_one_error_event(store, fake_redis):
    err = {"error": {"message": "too long", "type": "BadRequestError", "code": 400}}
    async with runtime(store, lambda r: httpx.Response(400, json=err)) as rt:
        result, events = await run_and_collect(store, fake_redis, rt)
        assert result["outcome"] == "rejected"
        assert [e.type for e in events] == [p.EventType.STARTED, p.EventType.ERROR]
        wire = json.loads(events[1].data)
        assert wire["status"] == 400
        assert wire["message"] == "too long"


async def test_non_streaming_publishes_one_result(store, fake_redis):
    completion = {
        "id": "e",
        "object": "chat.completion",
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    async with runtime(store, lambda r: httpx.Response(200, json=completion)) as rt:
        result, events = await run_and_collect(store, fake_redis, rt, stream=False)
        assert result["outcome"] == "completed"
        assert json.loads(events[-1].data)["id"] == "chatcmpl-x"


@pytest.mark.parametrize(("setting", "sent"), [(True, 1), (False, None)])
async def test_engine_priority_passes_the_band_on(store, fake_redis, setting, sent) -> None:
    """ENGINE_PRIORITY: the job's band (normal here) reaches vLLM as `priority` (high 0,
    normal 1, low 2: lower runs first); off, the engine is sent no `priority`."""
    bodies: list[dict] = []
    completion = {"id": "e", "object": "chat.completion", "choices": [], "usage": {}}

    def engine(r: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(r.content))
        return httpx.Response(200, json=completion)

    async with runtime(store, engine, engine_priority=setting) as rt:
        result, _ = await run_and_collect(store, fake_redis, rt, stream=False)
        assert result["outcome"] == "completed"
    assert [b.get("priority") for b in bodies] == [sent]


async def test_band_priorities_order_high_first(store) -> None:
    """ENGINE_PRIORITY on: a job of each band, run by the worker; the `priority` each one's
    engine request carries makes vLLM run high before normal before low (lower first)."""
    sent: dict[str, int] = {}
    completion = {"id": "e", "object": "chat.completion", "choices": [], "usage": {}}

    def engine(r: httpx.Request) -> httpx.Response:
        body = json.loads(r.content)
        sent[body["band"]] = body["priority"]
        return httpx.Response(200, json=completion)

    async with runtime(store, engine, engine_priority=True) as rt:
        for band in p.Band:
            spec = {**job(stream=False), "band": band.value, "body": {"band": band.value}}
            assert (await chat({RUNTIME: rt}, spec))["outcome"] == "completed"
    assert sorted(sent, key=sent.__getitem__) == ["high", "normal", "low"]
    assert len(set(sent.values())) == 3, "no two bands tie"


@pytest.mark.parametrize("grace", [0.0001])
async def test_nobody_listening_past_the_grace_abandons_the_job(store, grace):
    async def slow_body():
        """One chunk per millisecond: each goes out in a flush of its own, and flushes
        that reach nobody are 10x the grace apart."""
        for i in range(20):
            yield sse(chunk(str(i)), done=False)
            await asyncio.sleep(0.001)
        yield sse(chunk(finish="stop"))

    async with runtime(
        store, lambda r: httpx.Response(200, content=slow_body()), orphan_grace_s=grace
    ) as rt:
        result = await chat({RUNTIME: rt}, job())
        assert result["outcome"] == "client_gone"
        assert rt.metrics.jobs.labels("client_gone")._value.get() == 1


async def test_an_engine_refusing_auto_tools_teaches_the_worker(store, fake_redis):
    """vLLM without a tool-call parser refuses tool_choice "auto": the job fails with the
    engine's 400, and the worker's heartbeat will say so (gateways then refuse at once)."""
    message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser'
    err = {"error": {"message": message, "type": "BadRequestError", "code": 400}}
    async with runtime(store, lambda r: httpx.Response(400, json=err)) as rt:
        assert rt.auto_tools is None
        result, _events = await run_and_collect(store, fake_redis, rt)
        assert result["outcome"] == "rejected"
        assert rt.auto_tools is False


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (200, {"choices": []}, True),
        (
            400,
            {"error": {"message": '"auto" tool choice requires --enable-auto-tool-choice'}},
            False,
        ),
        (400, {"error": {"message": "some other complaint"}}, None),
        (503, {"error": {"message": "busy"}}, None),
    ],
)
async def test_the_tools_probe_reads_the_engines_answer(store, status, payload, expected):
    seen: list[httpx.Request] = []

    def engine(r: httpx.Request) -> httpx.Response:
        seen.append(r)
        return httpx.Response(status, json=payload)

    async with runtime(store, engine) as rt:
        assert await rt.engine.auto_tools("m") is expected
    probe = json.loads(seen[0].content)
    assert probe["tool_choice"] == "auto"
    assert probe["max_tokens"] == 1
    assert seen[0].headers["x-llmq-probe"] == "tools"
