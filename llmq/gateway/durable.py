"""Stored completions (``store: true``): retrieve, resume, cancel, delete.

A stored job's worker appends every event to the job's log (``llmq:log:<id>``, a Redis
Stream, entry id = the event's number) before it publishes it, and the job's record
(``llmq:stored:<id>``) says who owns it and where it stands. So any gateway replica can
serve the job again, during the job and for STORE_TTL_S after it:

- ``GET /v1/chat/completions/{id}``: the ``chat.completion`` assembled from the log, with a
  ``status`` (queued, in_progress, completed, failed, cancelled);
- ``GET ...?stream=true`` with ``Last-Event-ID: <n>`` (or ``starting_after=<n>``): the
  stream again after event ``n``: subscribe first, then read the log, then follow live
  events, dropping those the log already held (``Subscription.replay``);
- ``POST .../{id}/cancel``: stops the job, stored or not; ``DELETE .../{id}``: cancels it
  if it still runs and removes what is stored.

An Idempotency-Key retry attaches to its earlier job the same way (``attach``).
Only the API key that created a job may see it: any other gets 404, as for an unknown id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from llmq.gateway.auth import TenantDep
from llmq.gateway.event_stream import stream
from llmq.gateway.relay import JobRelay, Timings, until_disconnect
from llmq.gateway.state import GatewayState, StateDep
from llmq.gateway.tenant import Tenant
from llmq.shared import tracing
from llmq.shared.errors import (
    ClientClosedRequest,
    InvalidRequest,
    NotFound,
    QueueTimeout,
    ServiceError,
)
from llmq.shared.protocol import TERMINAL, Event, EventType, JobSpec, StoredJob, StoredStatus

logger = logging.getLogger(__name__)
router = APIRouter()
ENDED = frozenset({StoredStatus.COMPLETED, StoredStatus.FAILED, StoredStatus.CANCELLED})


def _queued_until(st: GatewayState, rec: StoredJob) -> float:
    """Until when (wall clock) the job may wait in the queue."""
    return rec.enqueued_at_ms / 1000 + st.settings.queue_timeout_s


async def owned(
    st: GatewayState, job_id: str, tenant: Tenant, rec: StoredJob | None = None, api: str = "chat"
) -> StoredJob:
    """The caller's stored job of ``api`` (``rec``, when read already), or 404 (also for
    another key's: its existence is private).

    A job still queued past QUEUE_TIMEOUT_S whose client left (a detached job: no relay
    waits to cancel it) is cancelled here, so its status says what happened."""
    rec = rec or await st.store.records.stored(job_id)
    if rec is None or rec.tenant != tenant.name or rec.api != api:
        what = "chat completion" if api == "chat" else "response"
        raise NotFound(f"no stored {what} {job_id!r} (unknown, expired or not stored)")
    if rec.status is StoredStatus.QUEUED and time.time() > _queued_until(st, rec) + 1:
        expired = QueueTimeout(f"waited {st.settings.queue_timeout_s:g}s in the queue")
        await st.store.jobs.cancel(rec.spec(), expired)
        rec = await st.store.records.stored(job_id) or rec
    return rec


async def follow(st: GatewayState, rec: StoredJob, after: int) -> tuple[JobRelay, Event | None]:
    """A relay for the job's events after ``after`` (logged, then live) and its first one;
    None when the job has ended and nothing is left after ``after``."""
    sub = await st.subs.subscribe(rec.id)  # first: no event falls between log and live
    relay = JobRelay(
        rec.spec(), sub, st.subs, st.store, st.settings, st.metrics, Timings(), resumed=True,
        span=tracing.resume_span(rec.model, rec.id, rec.trace),
    )  # fmt: skip
    try:
        logged = await st.store.records.read_log(rec.id, after)
        if not logged:
            last = await st.store.records.last_logged(rec.id)
            if last is not None and last.type in TERMINAL and last.seq <= after:
                relay.finished = True
                await relay.close(client_gone=False)
                return relay, None
        sub.replay(logged, after)
        queued = rec.status is StoredStatus.QUEUED
        first = await relay.follow(_queued_until(st, rec) if queued else 0.0)
    except BaseException:
        await relay.close(client_gone=False)
        raise
    return relay, first


async def _done_only(seq: int) -> AsyncIterator[bytes]:
    yield b"id: %d\ndata: [DONE]\n\n" % seq


async def replay(st: GatewayState, request: Request, rec: StoredJob, after: int) -> Response:
    """The job's answer again, from event ``after`` on: its stream or its completion."""
    try:
        relay, first = await until_disconnect(request, follow(st, rec, after))
    except ClientClosedRequest:
        return Response(status_code=499)
    if first is None:
        return stream(_done_only(after), st.settings)
    return await relay.respond(first)


async def attach(st: GatewayState, request: Request, tenant: Tenant, job_id: str) -> Response:
    """An Idempotency-Key retry: the earlier job's answer, streamed from its start."""
    return await replay(st, request, await owned(st, job_id, tenant), 0)


def _merge(choices: dict[int, dict[str, Any]], chunk: dict[str, Any]) -> None:
    for c in chunk.get("choices") or []:
        slot = choices.setdefault(int(c.get("index", 0)), {"role": "assistant", "content": ""})
        delta = c.get("delta") or {}
        if delta.get("role"):
            slot["role"] = delta["role"]
        for name in ("content", "reasoning_content"):
            if isinstance(delta.get(name), str):
                slot[name] = slot.get(name, "") + delta[name]
        if c.get("finish_reason"):
            slot["finish_reason"] = c["finish_reason"]


def assemble(rec: StoredJob, events: list[Event]) -> dict[str, Any]:
    """The stored ``chat.completion`` from the job's logged events (a streamed job's
    deltas joined per choice), with its ``status``, ``usage`` and the worker's
    ``timings``; ``error`` when it failed. Tool-call deltas are not joined (yet)."""
    status = rec.status
    out: dict[str, Any] = {
        "id": rec.id,
        "object": "chat.completion",
        "created": rec.enqueued_at_ms // 1000,
        "model": rec.model,
        "status": status,
        "choices": [],
        "usage": None,
        "metadata": rec.metadata,
    }
    choices: dict[int, dict[str, Any]] = {}
    for ev in events:
        if ev.type is EventType.RESULT:
            result: dict[str, Any] = json.loads(ev.data)
            result["status"] = StoredStatus.COMPLETED
            result["metadata"] = rec.metadata
            return result
        if ev.type is EventType.CHUNK:
            chunk = json.loads(ev.data)
            out["created"] = chunk.get("created", out["created"])
            _merge(choices, chunk)
        elif ev.type is EventType.DONE:
            done = json.loads(ev.data)
            if done.get("final"):
                _merge(choices, done["final"])
            out["usage"] = done.get("usage")
            out["timings"] = done.get("timings")
            status = StoredStatus.COMPLETED
        elif ev.type is EventType.ERROR:
            err = ServiceError.from_wire(json.loads(ev.data))
            out["error"] = err.body()["error"]
            if status is not StoredStatus.CANCELLED:
                status = StoredStatus.FAILED
    out["status"] = status
    out["choices"] = [
        {
            "index": i,
            "message": {k: v for k, v in c.items() if k != "finish_reason"},
            "finish_reason": c.get("finish_reason"),
            "logprobs": None,
        }
        for i, c in sorted(choices.items())
    ]
    return out


def _after(last_event_id: str | None, starting_after: int | None) -> int:
    raw = last_event_id if last_event_id is not None else starting_after
    try:
        after = int(raw or 0)
    except ValueError:
        raise InvalidRequest("Last-Event-ID is an event number", param="Last-Event-ID") from None
    if after < 0:
        raise InvalidRequest("Last-Event-ID is an event number", param="Last-Event-ID")
    return after


@router.get("/v1/chat/completions/{job_id}", response_model=None)
async def retrieve(
    job_id: str,
    request: Request,
    st: StateDep,
    tenant: TenantDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """A stored completion: now (``status``, the text so far), or streamed again."""
    rec = await owned(st, job_id, tenant)
    if not stream:
        out = assemble(rec, await st.store.records.read_log(rec.id))
        if rec.status is StoredStatus.QUEUED:  # where it stands in line, and when it starts
            position, eta_ms = await st.store.readings.position(
                rec, st.registry.capacity(rec.model)
            )
            if position:
                out.update(queue_position=position, eta_ms=eta_ms if eta_ms >= 0 else None)
        return JSONResponse(out)
    if not rec.stream:
        raise InvalidRequest("this completion was not streamed; GET it without stream")
    return await replay(st, request, rec, _after(last_event_id, starting_after))


async def _cancellable(st: GatewayState, job_id: str, tenant: Tenant) -> JobSpec | StoredJob:
    """The job to cancel: a stored one (its record), or one still queued or running."""
    rec = await st.store.records.stored(job_id)
    if rec is not None:
        return await owned(st, job_id, tenant, rec)
    spec = await st.store.records.job_spec(job_id)
    if spec is None or spec.tenant != tenant.name:
        raise NotFound(f"no queued or running chat completion {job_id!r}")
    return spec


@router.post("/v1/chat/completions/{job_id}/cancel")
async def cancel(job_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel a job, stored or not: a queued one never runs, a running one is aborted
    (its slot is free within moments). Answers the status it leaves."""
    job = await _cancellable(st, job_id, tenant)
    if isinstance(job, StoredJob) and job.status in ENDED:
        return {"id": job_id, "object": "chat.completion", "status": job.status}
    spec = job.spec() if isinstance(job, StoredJob) else job
    never_ran = await st.store.jobs.cancel(spec)
    logger.info("job %s: cancelled on request (%s)", job_id, "queued" if never_ran else "running")
    status = StoredStatus.CANCELLED if never_ran else "cancelling"
    return {"id": job_id, "object": "chat.completion", "status": status}


async def forget(st: GatewayState, rec: StoredJob) -> None:
    """A stored job deleted: cancelled first if it still runs (every API's DELETE)."""
    if rec.status not in ENDED:
        await st.store.jobs.cancel(rec.spec())
    await st.store.records.delete_stored(rec)


@router.delete("/v1/chat/completions/{job_id}")
async def delete(job_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Delete a stored completion (OpenAI's shape); cancels it first if it still runs."""
    await forget(st, await owned(st, job_id, tenant))
    return {"id": job_id, "object": "chat.completion.deleted", "deleted": True}
