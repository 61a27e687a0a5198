"""The gateway's SSE response (gateway/sse.py) and the relay's keep-alive comments."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest

from llmq.gateway import relay as relay_module
from llmq.gateway.relay import JobRelay
from llmq.gateway.sse import SSEResponse


class Client:
    """An ASGI peer: records what is sent; ``leave()`` makes receive() say disconnect;
    ``stall`` makes body sends block (a client that reads nothing)."""

    def __init__(self, stall: bool = False) -> None:
        self.sent: list[MutableMapping[str, Any]] = []
        self.gone = asyncio.Event()
        self.wrote = asyncio.Event()
        self.stall = stall

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self.stall and message["type"] == "http.response.body":
            await asyncio.sleep(3600)
        self.sent.append(message)
        self.wrote.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


class Body:
    """A body that yields ``frames`` then waits forever; ``closed`` once its cleanup ran."""

    def __init__(self, *frames: bytes, then_wait: bool = True) -> None:
        self.frames, self.then_wait, self.closed = frames, then_wait, False

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            for f in self.frames:
                yield f
            if self.then_wait:
                await asyncio.sleep(3600)
        finally:
            self.closed = True


async def test_a_stream_is_written_as_it_comes_and_completed() -> None:
    client, body = Client(), Body(b"data: 1\n\n", b"data: 2\n\n", then_wait=False)
    await SSEResponse(body())({"type": "http"}, client.receive, client.send)
    start = client.sent[0]
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert client.bodies() == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert client.sent[-1]["more_body"] is False
    assert body.closed


async def test_a_client_that_leaves_ends_the_stream_and_its_cleanup_runs() -> None:
    client, body = Client(), Body(b"data: 1\n\n")
    call = asyncio.ensure_future(SSEResponse(body())({"type": "http"}, client.receive, client.send))
    await asyncio.wait_for(client.wrote.wait(), 5)
    client.gone.set()
    await asyncio.wait_for(call, 5)  # returns quietly: no CancelledError escapes
    assert body.closed, "the relay's finally (which cancels the job) ran"
    assert client.bodies() == [b"data: 1\n\n"], "never completed: nobody to complete it for"


async def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout() -> None:
    client, body = Client(stall=True), Body(b"data: 1\n\n")
    started = time.monotonic()
    response = SSEResponse(body(), send_timeout_s=0.2)
    await asyncio.wait_for(response({"type": "http"}, client.receive, client.send), 5)
    assert time.monotonic() - started >= 0.2
    assert body.closed


async def test_a_quiet_stream_gets_keep_alive_comments_until_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing comes: a comment every PING_S (here 0.05 s), then, at the job's deadline,
    TimeoutError (the relay's error event)."""
    monkeypatch.setattr(relay_module, "PING_S", 0.05)

    class Silent:
        async def next(self, within: float) -> None:
            await asyncio.sleep(within)
            raise TimeoutError

    relay = JobRelay.__new__(JobRelay)
    relay.sub = Silent()  # type: ignore[assignment]
    relay.settings = types.SimpleNamespace(request_timeout_s=0.3)  # type: ignore[assignment]
    relay.silence_grace_s = 0.0
    relay.timings = types.SimpleNamespace(started=time.monotonic())  # type: ignore[assignment]

    pings: list[None] = []

    async def until_deadline() -> None:
        while await relay._next_or_ping() is None:
            pings.append(None)

    with pytest.raises(TimeoutError):
        await until_deadline()
    assert len(pings) >= 3, "one per 0.05 s over 0.3 s"
