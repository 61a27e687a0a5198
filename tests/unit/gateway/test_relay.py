"""The relay's SSE framing, fed with events by hand (no Redis needed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import MutableMapping
from typing import Any
from unittest.mock import AsyncMock

from llmq.gateway.events import Subscription
from llmq.gateway.metrics import GatewayMetrics
from llmq.gateway.relay import JobRelay, Timings
from llmq.shared.errors import RequestTimeout
from llmq.shared.protocol import Event, EventType, JobSpec
from llmq.shared.settings import Settings

CHUNK = {
    "id": "chatcmpl-x",
    "object": "chat.completion.chunk",
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}
FINAL = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


def relay(
    include_usage: bool, events: list[Event], request_timeout_s: float = 0.2
) -> tuple[JobRelay, AsyncMock]:
    spec = JobSpec(
        id="chatcmpl-x",
        model="m",
        stream=True,
        include_usage=include_usage,
        enqueued_at_ms=0,
        body={},
    )
    sub = Subscription("chatcmpl-x")
    for e in events:
        sub.queue.put_nowait(e.encode())
    store = AsyncMock()
    subs = AsyncMock()
    now = time.monotonic()
    r = JobRelay(
        spec,
        sub,
        subs,
        store,
        Settings(request_timeout_s=request_timeout_s),
        GatewayMetrics(),
        Timings(admitted=now, started=now, first=now),
        silence_grace_s=0.1,
    )
    return r, store


async def sse(r: JobRelay, first: Event) -> list[tuple[int | None, str]]:
    """The SSE frames as (id, data), however the relay grouped frames into writes."""
    body = b"".join([f async for f in r.sse_body(first)]).decode()
    *out, rest = body.split("\n\n")
    assert rest == ""
    parsed: list[tuple[int | None, str]] = []
    for frame in out:
        event_id = None
        if frame.startswith("id: "):
            head, frame = frame.split("\n", 1)
            event_id = int(head[4:])
        assert frame.startswith("data: ")
        parsed.append((event_id, frame[6:]))
    return parsed


async def frames(r: JobRelay, first: Event) -> list[str]:
    return [data for _, data in await sse(r, first)]


def done_event(seq: int) -> Event:
    return Event(seq, EventType.DONE, json.dumps({"final": FINAL, "usage": USAGE}).encode())


async def test_frames_carry_event_numbers_for_resumption() -> None:
    """Each delta's frame bears its event number; the finishing event's frames bear it
    only on the last one ([DONE]): a client that missed the final chunk resumes before it."""
    first = Event(2, EventType.CHUNK, json.dumps(CHUNK).encode())
    r, _ = relay(True, [Event(3, EventType.CHUNK, json.dumps(CHUNK).encode()), done_event(4)])
    r.sub._seq = 2
    out = await sse(r, first)
    assert [i for i, _ in out] == [2, 3, None, None, 4]
    assert out[-1] == (4, "[DONE]")


async def test_usage_chunk_only_when_asked() -> None:
    first = Event(2, EventType.CHUNK, json.dumps(CHUNK).encode())
    r, store = relay(True, [done_event(3)])
    r.sub._seq = 2
    out = await frames(r, first)
    assert out[-1] == "[DONE]"
    usage_chunk = json.loads(out[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == USAGE
    assert usage_chunk["timings"]["completion_tokens"] == 1
    assert json.loads(out[-3])["choices"][0]["finish_reason"] == "stop"
    store.jobs.cancel.assert_not_awaited()

    r, _ = relay(False, [done_event(3)])
    r.sub._seq = 2
    out = await frames(r, first)
    final = json.loads(out[-2])
    assert "usage" not in final
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["timings"]["completion_tokens"] == 1


async def test_failure_after_first_byte_is_one_error_event_then_done() -> None:
    err = Event(3, EventType.ERROR, json.dumps(RequestTimeout("slow").to_wire()).encode())
    r, store = relay(False, [err])
    r.sub._seq = 2
    out = await frames(r, Event(2, EventType.CHUNK, json.dumps(CHUNK).encode()))
    assert json.loads(out[1])["error"]["code"] == "request_timeout"
    assert out[2:] == ["[DONE]"]
    store.jobs.cancel.assert_not_awaited()


async def test_lost_events_end_the_stream_and_cancel_the_job() -> None:
    r, store = relay(False, [Event(5, EventType.CHUNK, json.dumps(CHUNK).encode())])
    r.sub._seq = 2
    out = await frames(r, Event(2, EventType.CHUNK, json.dumps(CHUNK).encode()))
    assert json.loads(out[1])["error"]["code"] == "stream_interrupted"
    assert out[-1] == "[DONE]"
    store.jobs.cancel.assert_awaited_once_with(r.spec)


async def test_silent_worker_times_out_and_cancels() -> None:
    r, store = relay(False, [])
    r.sub._seq = 2
    out = await frames(r, Event(2, EventType.CHUNK, json.dumps(CHUNK).encode()))
    assert json.loads(out[1])["error"]["code"] == "request_timeout"
    store.jobs.cancel.assert_awaited_once()


def rejections(r: JobRelay, reason: str) -> float:
    value: float = r.metrics.rejections.labels(reason, r.spec.model)._value.get()
    return value


async def test_timeout_counts_as_request_timeout_not_client_cancel() -> None:
    r, _ = relay(False, [])
    r.sub._seq = 2
    await frames(r, Event(2, EventType.CHUNK, json.dumps(CHUNK).encode()))
    assert rejections(r, "request_timeout") == 1
    assert rejections(r, "client_cancelled") == 0


async def test_client_leaving_mid_stream_cancels_the_job() -> None:
    """The streamed response, driven as uvicorn drives it: once the first frame is out the
    client disconnects; the response hears it and ends the body, whose cleanup cancels the
    job (counted as client_cancelled). Nothing else would end this stream for a minute."""
    r, store = relay(False, [], request_timeout_s=60)
    r.sub._seq = 2
    response = await r.respond(Event(2, EventType.CHUNK, json.dumps(CHUNK).encode()))
    sent: list[MutableMapping[str, Any]] = []
    wrote = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await wrote.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        wrote.set()

    await asyncio.wait_for(response({"type": "http", "method": "POST"}, receive, send), 30)
    store.jobs.cancel.assert_awaited_once_with(r.spec)
    assert rejections(r, "client_cancelled") == 1
    assert rejections(r, "request_timeout") == 0
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies[0].startswith(b"id: 2\ndata: ")
    assert all(m.get("more_body", True) for m in sent[1:]), "never completed: the client left"
