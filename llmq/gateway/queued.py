"""A streamed request that hears where it stands while it waits (``X-Queue-Updates: true``),
a chat completion or a response.

The SSE response starts at admission instead of at the first token, with comment lines
``: queued position=<n> eta_ms=<ms>`` (its place in line, 1 next; when it is expected to
start; ``eta_ms`` left out while unknown), at once and every ``UPDATE_EVERY_S`` until it
starts. SDKs ignore comments, and they keep proxies from closing a quiet stream. An error
before the first token (a queue timeout, a cancel) is then an error event, as after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from llmq.gateway.event_stream import RelayStream, stream
from llmq.gateway.registry import WorkerRegistry
from llmq.gateway.relay import DONE, JobRelay
from llmq.shared.errors import ServiceError
from llmq.shared.protocol import Event
from llmq.shared.queue.jobs import AdmitResult

UPDATE_EVERY_S = 2.0
HEADER = "x-queue-updates"


def wants_updates(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def comment(position: int, eta_ms: int) -> bytes:
    eta = b" eta_ms=%d" % eta_ms if eta_ms >= 0 else b""
    return b": queued position=%d%s\n\n" % (position, eta)


def respond(relay: JobRelay, admitted: AdmitResult, registry: WorkerRegistry) -> RelayStream:
    """The SSE answer of an admitted, streamed chat request: its place at admission first,
    then re-read every ``UPDATE_EVERY_S`` until it starts, then its chunks."""
    return stream(_chat_body(relay, admitted, registry), relay.settings)


async def waiting(
    relay: JobRelay, admitted: AdmitResult, registry: WorkerRegistry
) -> AsyncIterator[bytes | Event]:
    """While the job waits: a comment with its place (re-read from Redis,
    ``Readings.position``) every ``UPDATE_EVERY_S``; then, last, its first payload event.
    A failure before it (a queue timeout, a cancel) is raised as the ServiceError; a client
    that leaves while it waits cancels the job. Every API's waiting stream is this."""
    position, eta_ms = admitted.position, admitted.eta_ms
    spec = relay.spec
    opening = asyncio.ensure_future(relay.open())
    try:
        while True:
            if position > 0 and eta_ms != 0:  # eta 0: a slot is free, it starts now
                yield comment(position, eta_ms)
            done, _ = await asyncio.wait({opening}, timeout=UPDATE_EVERY_S)
            if done:
                break
            with contextlib.suppress(RedisError):  # an outage: the last place is said again
                capacity = registry.capacity(spec.model)
                position, eta_ms = await relay.store.readings.position(spec, capacity)
    except BaseException:  # the client left while it waited
        opening.cancel()
        await relay.close(client_gone=True)
        raise
    yield opening.result()  # (a ServiceError: the caller's to answer)


async def _chat_body(
    relay: JobRelay, admitted: AdmitResult, registry: WorkerRegistry
) -> AsyncIterator[bytes]:
    first: Event | None = None
    try:
        async for item in waiting(relay, admitted, registry):
            if isinstance(item, Event):
                first = item
            else:
                yield item
    except ServiceError as err:  # before its first token: one error event, then [DONE]
        yield relay.error_frame(err) + DONE
        await relay.close(client_gone=False)
        return
    assert first is not None
    async for frame in relay.sse_body(first):
        yield frame
