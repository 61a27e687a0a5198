"""The gateway's streamed answer (gateway/event_stream.py): sse-starlette's response as the
relay uses it. Each test drives the response as uvicorn would (an ASGI peer) and waits for
states, never for durations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from llmq.gateway.event_stream import stream
from llmq.shared.settings import Settings

WITHIN_S = 10.0  # generous bound on anything expected to happen "at once"
HTTP = {"type": "http", "method": "GET"}


class Client:
    """An ASGI peer: records what is sent; ``leave()`` makes receive() say disconnect;
    ``stall`` makes body sends block (a client that reads nothing)."""

    def __init__(self, stall: bool = False) -> None:
        self.sent: list[MutableMapping[str, Any]] = []
        self.gone = asyncio.Event()
        self.stall = stall
        self._changed = asyncio.Condition()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self.stall and message["type"] == "http.response.body":
            await asyncio.sleep(3600)
        self.sent.append(message)
        async with self._changed:
            self._changed.notify_all()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    async def until(self, done: Any) -> None:
        """Until ``done(self)`` holds (re-checked after every send)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: done(self)), WITHIN_S)


class Body:
    """A body that yields ``frames`` then waits for ``release`` (if ``then_wait``) and yields
    ``last``; ``closed`` once its cleanup ran."""

    def __init__(self, *frames: bytes, then_wait: bool = True, last: bytes = b"") -> None:
        self.frames, self.then_wait, self.last, self.closed = frames, then_wait, last, False
        self.release = asyncio.Event()

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            for f in self.frames:
                yield f
            if self.then_wait:
                await self.release.wait()
            if self.last:
                yield self.last
        finally:
            self.closed = True


def _settings(**kw: Any) -> Settings:
    return Settings(**kw)


async def test_frames_are_written_as_they_come_and_the_stream_completes() -> None:
    client, body = Client(), Body(b"data: 1\n\n", b"id: 2\ndata: 2\n\ndata: 3\n\n", then_wait=False)
    await stream(body(), _settings())(HTTP, client.receive, client.send)
    start = client.sent[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-cache"
    # Each write is one yielded chunk, byte for byte: the relay's coalesced frames.
    assert client.bodies() == [b"data: 1\n\n", b"id: 2\ndata: 2\n\ndata: 3\n\n", b""]
    assert client.sent[-1]["more_body"] is False
    assert body.closed


async def test_a_client_that_leaves_ends_the_stream_and_its_cleanup_runs() -> None:
    client, body = Client(), Body(b"data: 1\n\n")
    call = asyncio.ensure_future(stream(body(), _settings())(HTTP, client.receive, client.send))
    await client.until(lambda c: c.bodies() == [b"data: 1\n\n"])
    assert not body.closed
    client.gone.set()
    await asyncio.wait_for(call, WITHIN_S)  # returns quietly: no CancelledError escapes
    assert body.closed, "the relay's finally (which cancels the job) ran"
    assert client.bodies() == [b"data: 1\n\n"], "never completed: nobody to complete it for"


async def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout() -> None:
    client, body = Client(stall=True), Body(b"data: 1\n\n")
    response = stream(body(), _settings(client_send_timeout_s=0.2))
    # Returns (no exception reaches uvicorn) with the body closed: the job is cancelled.
    await asyncio.wait_for(response(HTTP, client.receive, client.send), WITHIN_S)
    assert body.closed
    assert client.bodies() == []


async def test_a_quiet_stream_gets_keep_alive_comments_then_goes_on() -> None:
    """While nothing comes, ``: ping`` comments every SSE_PING_S; the stream then carries
    on with what comes next and completes."""
    client, body = Client(), Body(b"data: 1\n\n", last=b"data: [DONE]\n\n")
    response = stream(body(), _settings(sse_ping_s=0.05))
    call = asyncio.ensure_future(response(HTTP, client.receive, client.send))
    await client.until(lambda c: c.bodies().count(b": ping\n\n") >= 2)
    assert client.bodies()[0] == b"data: 1\n\n"
    body.release.set()
    await asyncio.wait_for(call, WITHIN_S)
    bodies = client.bodies()
    # (A ping may also fall between the last frame and the end: the ping task's turn.)
    assert [b for b in bodies if b != b": ping\n\n"] == [
        b"data: 1\n\n",
        b"data: [DONE]\n\n",
        b"",
    ]
    assert bodies.index(b"data: [DONE]\n\n") >= 3, "two pings came before it"
    assert body.closed
