"""Relay: a job's Redis events -> the HTTP answer (SSE chunks or one JSON completion).

Concurrent tasks of one streamed request (see ARCHITECTURE.md):
  - the pub/sub reader (one per gateway) puts raw events into this request's queue;
  - the response task runs ``sse_body``: queue -> ``data: ...`` frames, as they arrive;
  - sse-starlette's disconnect listener cancels the response task when the client leaves,
    and ``sse_body``'s ``finally`` then cancels the job in Redis.
The HTTP status is held until ``open_job`` has seen the first payload event: the engine
accepted (200 + stream) or refused (its status, OpenAI error body).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.exceptions import RedisError

from llmq.gateway.events import Subscription, Subscriptions
from llmq.gateway.metrics import GatewayMetrics
from llmq.shared.errors import QueueTimeout, RequestTimeout, ServiceError
from llmq.shared.protocol import TERMINAL, Event, EventType, JobSpec
from llmq.shared.settings import Settings
from llmq.shared.store import Store

logger = logging.getLogger(__name__)

# After a cancel found the job already running, its STARTED event is at most this far away.
_STARTED_GRACE_S = 5.0
# Backstop beyond REQUEST_TIMEOUT_S (which the worker enforces itself) for a worker that died.
_WORKER_SILENCE_GRACE_S = 10.0
_DONE = b"data: [DONE]\n\n"


@dataclass
class Timings:
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    started: float = 0.0
    first: float = 0.0

    def report(self, completion_tokens: int, *, streamed: bool = True) -> dict[str, Any]:
        """The ``timings`` object of the final chunk / completion (milliseconds).

        ``tokens_per_s`` is the decode rate: completion tokens over the time from the first
        token to the end (from pickup to the end when the answer came in one piece).
        """
        end = time.monotonic()
        gen_s = end - ((self.first if streamed else self.started) or end)
        return {
            "queue_wait_ms": round((self.started - self.admitted) * 1000, 2),
            "ttft_ms": round((self.first - self.arrived) * 1000, 2),
            "total_ms": round((end - self.arrived) * 1000, 2),
            "completion_tokens": completion_tokens,
            "tokens_per_s": round(completion_tokens / gen_s, 2) if gen_s > 0 else None,
        }


@dataclass
class JobRelay:
    """Everything one admitted job's relay needs."""

    spec: JobSpec
    sub: Subscription
    subs: Subscriptions
    store: Store
    settings: Settings
    metrics: GatewayMetrics
    timings: Timings
    finished: bool = False
    silence_grace_s: float = _WORKER_SILENCE_GRACE_S

    async def open(self) -> Event:
        """Wait for pickup (QUEUE_TIMEOUT_S), then for the first payload; errors raise."""
        s, t = self.settings, self.timings
        try:
            event = await self.sub.next(
                max(0.0, s.queue_timeout_s - (time.monotonic() - t.admitted))
            )
        except TimeoutError:
            if await self.store.cancel(self.spec):
                self.finished = True
                raise QueueTimeout(
                    f"waited {s.queue_timeout_s:g}s in the queue; try again"
                ) from None
            try:  # it started just as we gave up: its STARTED event is on the way
                event = await self.sub.next(_STARTED_GRACE_S)
            except TimeoutError:
                raise RequestTimeout("the worker took the job but sent nothing") from None
        t.started = time.monotonic()
        self.metrics.queue_wait.observe(t.started - t.admitted)
        self.metrics.band_queue_wait.labels(self.spec.band).observe(t.started - t.admitted)
        self._raise_if_error(event)
        try:
            event = await self.sub.next(s.request_timeout_s + self.silence_grace_s)
        except TimeoutError:
            raise RequestTimeout(f"no answer within {s.request_timeout_s:g}s") from None
        self._raise_if_error(event)
        self.finished = event.type in TERMINAL
        t.first = time.monotonic()
        self.metrics.ttft.observe(t.first - t.arrived)
        return event

    def _raise_if_error(self, event: Event) -> None:
        if event.type is EventType.ERROR:
            self.finished = True
            raise ServiceError.from_wire(json.loads(event.data))

    async def close(self, *, client_gone: bool) -> None:
        """Cancel the job unless it ended, and drop the subscription; safe under cancellation.

        ``client_gone``: the client left (counted as ``client_cancelled``), as opposed to the
        gateway ending the job itself after a timeout or lost events (counted where raised).
        """
        with anyio.CancelScope(shield=True):
            if not self.finished:
                if client_gone:
                    logger.info("job %s: client gone, cancelling", self.spec.id)
                    self.metrics.reject("client_cancelled", self.spec.tenant)
                try:
                    await self.store.cancel(self.spec)
                except RedisError as exc:  # the worker's orphan check stops it instead
                    logger.warning("job %s: cannot cancel (Redis: %s)", self.spec.id, exc)
                self.finished = True
            await self.subs.unsubscribe(self.sub)

    def _deadline_left(self) -> float:
        limit = self.settings.request_timeout_s + self.silence_grace_s
        return max(0.0, limit - (time.monotonic() - self.timings.started))

    def _account(self, usage: dict[str, Any] | None) -> int:
        usage = usage or {}
        completion = int(usage.get("completion_tokens") or 0)
        prompt = int(usage.get("prompt_tokens") or 0)
        self.metrics.completion_tokens.inc(completion)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.tenant_tokens.labels(self.spec.tenant, "completion").inc(completion)
        self.metrics.tenant_tokens.labels(self.spec.tenant, "prompt").inc(prompt)
        return completion

    def completion(self, event: Event) -> dict[str, Any]:
        """``stream=false``: the engine's chat.completion plus the gateway's timings."""
        result: dict[str, Any] = json.loads(event.data)
        usage = result.get("usage")
        result["timings"] = self.timings.report(self._account(usage), streamed=False)
        return result

    def _finish(self, event: Event) -> list[bytes]:
        done = json.loads(event.data)
        final: dict[str, Any] | None = done.get("final")
        usage: dict[str, Any] | None = done.get("usage")
        timings = self.timings.report(self._account(usage))
        frames = []
        if self.spec.include_usage:
            if final is not None:
                frames.append(final)
            frames.append(
                {
                    "id": self.spec.id,
                    "object": "chat.completion.chunk",
                    "created": (final or {}).get("created", int(time.time())),
                    "model": self.spec.model,
                    "choices": [],
                    "usage": usage,
                    "timings": timings,
                }
            )
        else:
            frames.append(
                {
                    **(
                        final
                        or {
                            "id": self.spec.id,
                            "object": "chat.completion.chunk",
                            "model": self.spec.model,
                            "choices": [],
                        }
                    ),
                    "timings": timings,
                }
            )
        return [_frame(json.dumps(f, separators=(",", ":"))) for f in frames]

    def _error_frame(self, err: ServiceError) -> bytes:
        self.metrics.reject(err.code, self.spec.tenant)
        return _frame(json.dumps(err.body(), separators=(",", ":")))

    async def sse_body(self, first: Event) -> AsyncIterator[bytes]:
        """The SSE body: chunks as they come, the final chunk with timings, ``[DONE]``.

        A failure after the first byte is one error event, then ``[DONE]``, as vLLM's own
        server does.
        """
        event = first
        client_gone = True  # unless we end the stream ourselves below
        try:
            while True:
                # Every event already here goes out in one write: under load that is
                # several deltas per send instead of one (at low load, one).
                frames = []
                for ev in (event, *self.sub.ready()):
                    if ev.type is EventType.CHUNK:
                        frames.append(b"data: " + ev.data + b"\n\n")
                        continue
                    self.finished = True
                    if ev.type is EventType.DONE:
                        frames += self._finish(ev)
                    else:  # ERROR (or an unexpected type): terminal
                        err = ServiceError.from_wire(json.loads(ev.data))
                        frames.append(self._error_frame(err))
                    frames.append(_DONE)
                    yield b"".join(frames)
                    return
                yield b"".join(frames)
                event = await self.sub.next(self._deadline_left())
        except TimeoutError:
            client_gone = False
            yield self._error_frame(RequestTimeout("the engine stopped answering"))
            yield _DONE
        except ServiceError as exc:  # StreamInterrupted
            client_gone = False
            logger.warning("job %s: %s", self.spec.id, exc.message)
            yield self._error_frame(exc)
            yield _DONE
        finally:
            await self.close(client_gone=client_gone)


def _frame(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"
