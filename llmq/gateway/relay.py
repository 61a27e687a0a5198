"""Relay: a job's Redis events -> the HTTP answer (SSE chunks or one JSON completion).

Concurrent tasks of one streamed request (see ARCHITECTURE.md):
  - the pub/sub reader (one per gateway) puts raw events into this request's queue;
  - the response task runs ``sse_body``: queue -> ``data: ...`` frames, as they arrive;
  - sse-starlette's disconnect listener (``gateway.event_stream``) cancels the response
    task when the client leaves, and ``sse_body``'s ``finally`` then cancels the job in
    Redis; its ping task sends keep-alive comments while the stream is quiet.
The HTTP status is held until ``open`` has seen the first payload event: the engine
accepted (200 + stream) or refused (its status, OpenAI error body).

Every SSE frame of a job's event carries ``id: <seq>`` (a finishing event's frames: on the
last, ``[DONE]``), the number a resumed stream starts after (``Last-Event-ID``). A stored
job (``store: true``) is never cancelled by its relay: when its client leaves, the job runs
on (detached) for a resume or a retrieval; only an explicit cancel stops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from opentelemetry.trace import INVALID_SPAN, Span, StatusCode
from redis.exceptions import RedisError

from llmq.gateway.event_stream import stream, wait_disconnect
from llmq.gateway.events import Subscription, Subscriptions
from llmq.gateway.metrics import GatewayMetrics
from llmq.shared import tracing
from llmq.shared.errors import (
    ClientClosedRequest,
    DeadlineUnattainable,
    QueueTimeout,
    QueueUnavailable,
    RequestTimeout,
    ServiceError,
)
from llmq.shared.protocol import TERMINAL, Api, Event, EventType, JobSpec
from llmq.shared.queue.store import Store
from llmq.shared.queue.waiting import LATE
from llmq.shared.settings import Settings

logger = logging.getLogger(__name__)

# After a cancel found the job already running, its STARTED event is at most this far away.
_STARTED_GRACE_S = 5.0
_ENDED_CHECK_S = 3.0  # while a job waits to start: how often its client checks it did not end
# Backstop beyond REQUEST_TIMEOUT_S (which the worker enforces itself) for a worker that died.
_WORKER_SILENCE_GRACE_S = 10.0
DONE = b"data: [DONE]\n\n"
# Under load (this gateway follows BUSY_STREAMS jobs or more), a stream writes at most every
# COALESCE_S: the deltas that came meanwhile go out in one write. Each write costs the
# same whatever it carries (the ASGI send chain, uvicorn's chunk, a syscall): at 64 streams
# of 5 ms tokens that was a fifth of the gateway's CPU. Clients still get one SSE event per
# delta, a few together; the first payload is never held.
BUSY_STREAMS = 32
COALESCE_S = 0.02
T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then raise ClientClosedRequest)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientClosedRequest("client disconnected")
    return task.result()


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
    resumed: bool = False  # a stored job followed again (gateway.durable), not its POST
    # Runs on when its client leaves (a stored chat completion, a background response);
    # None: as ``spec.stored`` says.
    detached: bool | None = None
    # The request's ``<operation> <model>`` span (``gateway.submission``), ended by
    # ``close``; a no-op span when tracing is off.
    span: Span = field(default=INVALID_SPAN)
    error: str = ""  # the OpenAI code the job ended with, for its span

    async def open(self) -> Event:
        """Wait for pickup (QUEUE_TIMEOUT_S, or the job's deadline when it is dropped
        then), then for the first payload; errors raise."""
        try:
            event = await self._open()
        except DeadlineUnattainable:  # dropped at its deadline (here, or by a pick)
            self.metrics.deadline(self.spec.model, self.spec.band.value, "expired")
            raise
        except QueueTimeout:  # a best-effort request that never started: not on time
            if self.spec.ttft_objective_ms:
                self.metrics.objective_result(self.spec.model, self.spec.band.value, "missed")
            raise
        objective = self.spec.ttft_objective_ms
        if objective:
            t = self.timings
            # A stream's first token; a whole answer's start (its first token is not seen).
            ttft = (t.first if self.spec.stream else t.started) - t.arrived
            met = "met" if ttft * 1000 <= objective else "missed"
            self.metrics.objective_result(self.spec.model, self.spec.band.value, met)
        return event

    async def _open(self) -> Event:
        s, t = self.settings, self.timings
        spec = self.spec
        wait_s, late = s.queue_timeout_s, None
        if spec.ttft_objective_ms and not spec.best_effort:
            late = DeadlineUnattainable(LATE.message)
            wait_s = min(wait_s, spec.ttft_objective_ms / 1000)
        try:
            event = await self._until_started(wait_s)
        except TimeoutError:
            timeout = late or QueueTimeout(f"waited {s.queue_timeout_s:g}s in the queue; try again")
            # Only if it still waits: one that started just now is served, not aborted.
            if await self.store.jobs.cancel(self.spec, timeout, queued_only=True):
                self.finished = True
                self.error = str(timeout.code)
                raise timeout from None
            try:  # it started just as we gave up: its STARTED event is on the way
                event = await self.sub.next(_STARTED_GRACE_S)
            except TimeoutError:
                raise RequestTimeout("the worker took the job but sent nothing") from None
        t.started = time.monotonic()
        self._raise_if_error(event)  # a cancel while it waited (an out-of-band error)
        waited = t.started - t.admitted
        ex = tracing.exemplar_of(self.span)
        self.metrics.queue_wait.labels(self.spec.model).observe(waited, exemplar=ex)
        self.metrics.band_queue_wait.labels(self.spec.band).observe(waited, exemplar=ex)
        if self.span.is_recording():
            worker = event.data.decode(errors="replace")
            self.span.add_event("started", {"llmq.worker": worker})
            self.span.set_attribute("llmq.queue.wait_s", round(waited, 6))
        try:
            event = await self.sub.next(s.request_timeout_s + self.silence_grace_s)
        except TimeoutError:
            raise RequestTimeout(f"no answer within {s.request_timeout_s:g}s") from None
        self._raise_if_error(event)
        self.finished = event.type in TERMINAL
        t.first = time.monotonic()
        ttft = t.first - t.arrived
        self.metrics.ttft.labels(self.spec.model).observe(
            ttft, exemplar=tracing.exemplar_of(self.span)
        )
        self.span.set_attribute(tracing.TIME_TO_FIRST_CHUNK, round(ttft, 6))
        return event

    async def _until_started(self, queue_timeout_s: float) -> Event:
        """The first event, within what is left of ``queue_timeout_s``. Every
        _ENDED_CHECK_S without one, whether the job ended unheard: its events were lost
        (they went to a Redis primary that failed, or while this gateway's pub/sub was
        reconnecting), so nothing more will come: the client is told now, not at the
        queue timeout."""
        t = self.timings
        while True:
            left = queue_timeout_s - (time.monotonic() - t.admitted)
            try:
                return await self.sub.next(max(0.0, min(left, _ENDED_CHECK_S)))
            except TimeoutError:
                if left <= _ENDED_CHECK_S:
                    raise
            try:
                ended = await self.store.records.ended(self.spec.id)
            except RedisError:
                continue  # an outage: wait on, the subscription is kept
            if ended:
                raise QueueUnavailable(
                    "the job ended while its events could not reach this gateway "
                    "(a Redis outage or failover); retry"
                )

    async def follow(self, queued_until: float) -> Event:
        """A resumed relay's first event (its ``open``): the job may still wait in the queue
        (until ``queued_until``, wall clock), or run. A queued job whose time is up and that
        nobody cancelled (its client left: it is detached) is cancelled here, as the POST's
        relay would have; the cancel's error event is then the next one."""
        s, t = self.settings, self.timings
        while True:
            waiting = not self.sub.heard and time.time() < queued_until
            if waiting:
                within = queued_until - time.time() + 0.5
            else:
                within = s.request_timeout_s + self.silence_grace_s
            try:
                event = await self.sub.next(within)
            except TimeoutError:
                if waiting:
                    expired = QueueTimeout(f"waited {s.queue_timeout_s:g}s in the queue")
                    await self.store.jobs.cancel(self.spec, expired)
                    queued_until = 0.0
                    continue
                raise RequestTimeout(f"no answer within {s.request_timeout_s:g}s") from None
            if event.type is EventType.STARTED:
                continue
            t.started = t.started or time.monotonic()
            self._raise_if_error(event)
            self.finished = event.type in TERMINAL
            t.first = time.monotonic()
            return event

    def _raise_if_error(self, event: Event) -> None:
        if event.type is EventType.ERROR:
            self.finished = True
            err = ServiceError.from_wire(json.loads(event.data))
            self.error = str(err.code or err.status)
            raise err

    async def close(self, *, client_gone: bool) -> None:
        """Cancel the job unless it ended, and drop the subscription; safe under cancellation.

        ``client_gone``: the client left (counted as ``client_cancelled``), as opposed to the
        gateway ending the job itself after a timeout or lost events (counted where raised).
        """
        detached = self.spec.stored if self.detached is None else self.detached
        self._end_span(client_gone=client_gone and not self.finished, detached=detached)
        with anyio.CancelScope(shield=True):
            if detached and not self.finished:  # it runs on
                if client_gone:
                    logger.info("job %s: client gone, the stored job runs on", self.spec.id)
            elif not self.finished:
                if client_gone:
                    logger.info("job %s: client gone, cancelling", self.spec.id)
                    self.metrics.reject("client_cancelled", self.spec.tenant, self.spec.model)
                try:
                    await self.store.jobs.cancel(self.spec)
                except RedisError as exc:  # the worker's orphan check stops it instead
                    logger.warning("job %s: cannot cancel (Redis: %s)", self.spec.id, exc)
                self.finished = True
            await self.subs.unsubscribe(self.sub)

    def _end_span(self, *, client_gone: bool, detached: bool) -> None:
        span = self.span
        if not span.is_recording():
            return
        if client_gone:
            span.set_attribute("llmq.client_gone", True)
            if not detached:
                self.error = self.error or "client_closed_request"
        if detached and not self.finished:
            span.set_attribute("llmq.detached", True)  # the job runs on; its span goes on
        if self.error:
            span.set_attribute(tracing.ERROR_TYPE, self.error)
            span.set_status(StatusCode.ERROR, self.error)
        span.end()
        self.span = INVALID_SPAN  # once (close may run twice)

    def _deadline_left(self) -> float:
        limit = self.settings.request_timeout_s + self.silence_grace_s
        return max(0.0, limit - (time.monotonic() - self.timings.started))

    def account(self, usage: dict[str, Any] | None) -> int:
        """Count a finished job's tokens (metrics); returns its completion tokens."""
        usage = usage or {}
        completion = int(usage.get("completion_tokens") or 0)
        prompt = int(usage.get("prompt_tokens") or 0)
        self.metrics.completion_tokens.inc(completion)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.tenant_tokens.labels(self.spec.tenant, "completion").inc(completion)
        self.metrics.tenant_tokens.labels(self.spec.tenant, "prompt").inc(prompt)
        self.span.set_attribute(tracing.INPUT_TOKENS, prompt)
        self.span.set_attribute(tracing.OUTPUT_TOKENS, completion)
        return completion

    def finish_reasons(self, answer: dict[str, Any] | None) -> None:
        """The finish reasons of a final chunk or a whole completion, on the span."""
        reasons = [c.get("finish_reason") for c in (answer or {}).get("choices") or []]
        if any(reasons):
            self.span.set_attribute(tracing.FINISH_REASONS, [str(r) for r in reasons if r])

    def completion(self, event: Event) -> dict[str, Any]:
        """``stream=false``: the engine's chat.completion plus the gateway's timings."""
        result: dict[str, Any] = json.loads(event.data)
        self.finish_reasons(result)
        if not self.resumed:  # (a resumed one keeps the worker's timings: see worker.job)
            usage = result.get("usage")
            result["timings"] = self.timings.report(self.account(usage), streamed=False)
        return result

    def _finish(self, event: Event) -> list[bytes]:
        done = json.loads(event.data)
        final: dict[str, Any] | None = done.get("final")
        usage: dict[str, Any] | None = done.get("usage")
        self.finish_reasons(final)
        # A resumed stream: counted once (by the first relay); the timings are the worker's.
        timings = done.get("timings") if self.resumed else self.timings.report(self.account(usage))
        frames = []
        kind = "text_completion" if self.spec.api is Api.COMPLETIONS else "chat.completion.chunk"
        if self.spec.include_usage:
            if final is not None:
                frames.append(final)
            frames.append(
                {
                    "id": self.spec.id,
                    "object": kind,
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
                            "object": kind,
                            "model": self.spec.model,
                            "choices": [],
                        }
                    ),
                    "timings": timings,
                }
            )
        return [_frame(json.dumps(f, separators=(",", ":"))) for f in frames]

    def error_frame(self, err: ServiceError) -> bytes:
        self.error = str(err.code or err.status)
        self.metrics.reject(err.code, self.spec.tenant, self.spec.model)
        return _frame(json.dumps(err.body(), separators=(",", ":")))

    async def respond(self, first: Event) -> Response:
        """The HTTP answer once the first payload event is here: the SSE stream, or (no
        stream) the completion."""
        if self.spec.stream:
            # A client that stops reading: the send blocks, and after CLIENT_SEND_TIMEOUT_S
            # the stream ends and its job is cancelled (no slot waits on a stalled socket).
            return stream(self.sse_body(first), self.settings)
        await self.close(client_gone=False)  # the result is in: nothing left to cancel
        return JSONResponse(self.completion(first))

    async def batches(self, first: Event) -> AsyncIterator[list[Event]]:
        """The job's events from ``first`` on, each batch what had arrived by then (under
        load several deltas, at low load one), up to the terminal event (the last of its
        batch). Raises TimeoutError at the job's deadline and StreamInterrupted when events
        were lost."""
        event = first
        while True:
            batch = [event, *self.sub.ready()]
            for i, ev in enumerate(batch):
                if ev.type is not EventType.CHUNK:
                    self.finished = True
                    yield batch[: i + 1]
                    return
            yield batch
            if len(self.subs) >= BUSY_STREAMS:
                await asyncio.sleep(COALESCE_S)
            event = await self.sub.next(self._deadline_left())

    async def sse_body(self, first: Event) -> AsyncIterator[bytes]:
        """The SSE body: chunks as they come, the final chunk with timings, ``[DONE]``.

        A failure after the first byte is one error event, then ``[DONE]``, as vLLM's own
        server does.
        """
        client_gone = True  # unless we end the stream ourselves below
        try:
            async for batch in self.batches(first):
                # Every event already here goes out in one write.
                frames = []
                for ev in batch:
                    if ev.type is EventType.CHUNK:
                        frames.append(b"id: %d\ndata: %s\n\n" % (ev.seq, ev.data))
                        continue
                    if ev.type is EventType.DONE:
                        frames += self._finish(ev)
                    else:  # ERROR (or an unexpected type): terminal
                        err = ServiceError.from_wire(json.loads(ev.data))
                        frames.append(self.error_frame(err))
                    frames.append(b"id: %d\n%s" % (ev.seq, DONE) if ev.seq else DONE)
                yield b"".join(frames)
        except TimeoutError:
            client_gone = False
            yield self.error_frame(RequestTimeout("the engine stopped answering"))
            yield DONE
        except ServiceError as exc:  # StreamInterrupted
            client_gone = False
            logger.warning("job %s: %s", self.spec.id, exc.message)
            yield self.error_frame(exc)
            yield DONE
        finally:
            await self.close(client_gone=client_gone)


def _frame(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"
