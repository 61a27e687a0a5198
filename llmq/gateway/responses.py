"""OpenAI's Responses API: ``POST /v1/responses`` and the stored response's routes.

A request is converted into a chat job (``shared.responses.request``) and goes through the
same path as a chat completion (``gateway.submission``: readiness, caps, the key's limits,
bands, the model's bound, cache-aware pickup, sealing); its answer is built from the job's
events by ``shared.responses.events.ResponseBuilder``.

- foreground (``background`` false): the HTTP status waits for the job's first payload (an
  engine refusal is its own status, as for chat); then the stream of typed events, or the
  ``response`` object. A client that leaves cancels its job, stored or not.
- ``store`` (true by default): the job is logged and its record kept STORE_TTL_S, with its
  input items and the fields the response repeats (sealed): ``GET /v1/responses/{id}``,
  ``.../input_items``, ``DELETE``, and ``previous_response_id`` (the stored chain: every
  earlier input item and every output, function calls included) work from any gateway.
- ``background``: answered at once, ``status: "queued"`` (with the queue position and ETA);
  the job runs detached. ``GET`` polls it, ``POST .../cancel`` stops it (queued: it never
  runs; running: the engine's request is aborted), ``GET ...?stream=true&starting_after=N``
  streams its events after sequence number N, live or from the log, from any gateway.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from llmq.gateway import durable, queued
from llmq.gateway.auth import TenantDep
from llmq.gateway.body import check_size, read_json
from llmq.gateway.event_stream import stream
from llmq.gateway.pagination import page
from llmq.gateway.relay import JobRelay, Timings, until_disconnect
from llmq.gateway.state import GatewayState, StateDep
from llmq.gateway.submission import arrived, first_event, submit
from llmq.gateway.tenant import Tenant
from llmq.shared.chat import band_for, to_job_spec
from llmq.shared.errors import (
    ClientClosedRequest,
    InvalidRequest,
    PreviousResponseNotFound,
    RequestTimeout,
    ServiceError,
)
from llmq.shared.protocol import Api, Event, EventType, StoredJob, StoredStatus
from llmq.shared.queue.jobs import AdmitResult
from llmq.shared.responses.events import ResponseBuilder, StreamEvent, replay
from llmq.shared.responses.request import (
    InputItem,
    ToolNames,
    chat_tools,
    echo,
    items_json,
    new_response_id,
    parse_items,
    parse_request,
    to_chat,
)

logger = logging.getLogger(__name__)
router = APIRouter()
API = Api.RESPONSES
OMITTED_HEADER = "x-llmq-omitted-tools"
_MAX_CHAIN_ITEMS = 4096


def _builder(rec_id: str, model: str, created_at: int, kept: dict[str, Any]) -> ResponseBuilder:
    """The builder of a stored response, from what it kept."""
    names = ToolNames()
    chat_tools(kept["echo"].get("tools") or [], names, reject_builtin=False)
    return ResponseBuilder(rec_id, model, created_at, kept["echo"], names)


async def _stored(st: GatewayState, rec: StoredJob) -> tuple[dict[str, Any], ResponseBuilder]:
    kept = await st.store.records.kept(rec.id)
    if not isinstance(kept, dict):
        raise InvalidRequest(f"response {rec.id!r} kept no request", param="response_id")
    return kept, _builder(rec.id, rec.model, rec.enqueued_at_ms // 1000, kept)


async def _snapshot(st: GatewayState, rec: StoredJob) -> dict[str, Any]:
    """A stored response as it stands: its log replayed, its status its record's."""
    _, builder = await _stored(st, rec)
    replay(builder, await st.store.records.read_log(rec.id))
    out = builder.response()
    if rec.status is StoredStatus.CANCELLED:  # (a running job's worker says why it ended)
        out["status"] = "cancelled"
    elif not builder.ended:  # still queued or running, or cut off (its record says)
        waiting = {StoredStatus.QUEUED: "queued", StoredStatus.IN_PROGRESS: "in_progress"}
        out["status"] = waiting.get(rec.status, "failed")
    if rec.status is StoredStatus.QUEUED:  # beyond OpenAI: where it stands in line
        position, eta_ms = await st.store.readings.position(rec, st.registry.capacity(rec.model))
        if position:
            out.update(queue_position=position, eta_ms=eta_ms if eta_ms >= 0 else None)
    return out


async def _chain(st: GatewayState, tenant: Tenant, previous_id: str) -> list[InputItem]:
    """The conversation before a response: the previous one's context and input items,
    then its output (messages and function calls), as input items."""
    rec = await st.store.records.stored(previous_id)
    if rec is None or rec.tenant != tenant.name or rec.api != API:
        raise PreviousResponseNotFound(
            f"Previous response with id '{previous_id}' not found.", param="previous_response_id"
        )
    kept, builder = await _stored(st, rec)
    replay(builder, await st.store.records.read_log(rec.id))
    output = [
        {k: v for k, v in item.items() if k not in ("id", "status")}
        for item in builder.response()["output"]
    ]
    items = [*kept["context"], *kept["input"], *output]
    if len(items) > _MAX_CHAIN_ITEMS:
        raise InvalidRequest(
            f"the conversation holds over {_MAX_CHAIN_ITEMS} items", param="previous_response_id"
        )
    return parse_items(items)


async def _body(
    relay: JobRelay, builder: ResponseBuilder, first: Event, after: int = -1, started: bool = False
) -> AsyncIterator[bytes]:
    """The stream: each job event's stream events (those numbered after ``after``), as
    they come, after ``response.created`` (unless ``started``: sent already); a failure is
    ``error`` then ``response.failed``."""
    client_gone = True  # unless the stream ends by itself below

    def frames(events: list[StreamEvent]) -> bytes:
        return b"".join(e.frame() for e in events if e.sequence_number > after)

    try:
        out = [] if started else builder.start()
        async for batch in relay.batches(first):
            for ev in batch:
                out += builder.feed(ev)
                if ev.type is EventType.DONE:
                    relay.account(json.loads(ev.data).get("usage"))
            yield frames(out)
            out = []
        client_gone = False
    except TimeoutError:
        client_gone = False
        yield frames(builder.fail(RequestTimeout("the engine stopped answering")))
    except ServiceError as exc:  # StreamInterrupted
        client_gone = False
        logger.warning("job %s: %s", relay.spec.id, exc.message)
        yield frames(builder.fail(exc))
    finally:
        await relay.close(client_gone=client_gone)


async def _waiting_body(
    relay: JobRelay, builder: ResponseBuilder, admitted: AdmitResult, st: GatewayState
) -> AsyncIterator[bytes]:
    """``X-Queue-Updates: true``: ``response.created`` at admission, comments with the
    queue position and ETA while it waits (``gateway.queued``), then the stream."""
    yield b"".join(e.frame() for e in builder.start())
    first: Event | None = None
    try:
        async for item in queued.waiting(relay, admitted, st.registry):
            if isinstance(item, Event):
                first = item
            else:
                yield item
    except ServiceError as err:  # before its first token: error, response.failed
        yield b"".join(e.frame() for e in builder.fail(err))
        await relay.close(client_gone=False)
        return
    assert first is not None
    async for frame in _body(relay, builder, first, started=True):
        yield frame


async def _collect(relay: JobRelay, builder: ResponseBuilder, first: Event) -> dict[str, Any]:
    """``stream: false``: every event consumed, the final ``response`` object."""
    async for _ in _body(relay, builder, first):
        pass
    return builder.response()


@router.post("/v1/responses", response_model=None)
async def create(request: Request, st: StateDep, tenant: TenantDep) -> Response:
    """OpenAI's ``responses.create`` (see the module docstring)."""
    try:
        data = read_json(await request.body(), st.settings)
        req = parse_request(data, st.settings.passthrough_extra)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    arrived(st, tenant.name)
    if req.background and not req.store:
        raise InvalidRequest("background responses must be stored (store: true)", param="store")
    context = await _chain(st, tenant, req.previous_response_id) if req.previous_response_id else []
    chat, names, omitted = to_chat(
        req, context, reject_builtin=st.settings.responses_builtin_tools == "reject"
    )
    check_size(chat, st.settings, param="input")  # the whole conversation, chain included
    chat.model = st.registry.resolve(chat.model)  # MODEL_ALIASES: the served name
    rid = new_response_id()
    band = band_for(chat.service_tier, tenant.band)
    spec = to_job_spec(
        chat, rid, tenant=tenant.name, band=band, tpm=tenant.tpm, store=req.store
    ).model_copy(update={"api": API, "background": req.background})  # fmt: skip
    fields = echo(req)
    kept = {"echo": fields, "input": items_json(req.items()), "context": items_json(context)}
    record = StoredJob.of(spec, "", req.metadata) if req.store else None
    timings = Timings()
    relay, admitted = await submit(
        st, request, spec, chat, tenant, timings, record=record,
        kept=json.dumps(kept, separators=(",", ":")) if req.store else "",
    )  # fmt: skip
    relay.detached = req.background  # a foreground response's client leaving cancels it
    headers = {OMITTED_HEADER: ",".join(omitted)} if omitted else {}
    builder = ResponseBuilder(rid, relay.spec.model, spec.enqueued_at_ms // 1000, fields, names)
    if req.background and not req.stream:
        await relay.close(client_gone=False)  # detached: it runs on; nothing to follow here
        out = builder.response()
        if admitted.position:
            eta = admitted.eta_ms if admitted.eta_ms >= 0 else None
            out.update(queue_position=admitted.position, eta_ms=eta)
        return JSONResponse(out, headers=headers)
    if req.stream and queued.wants_updates(request.headers.get(queued.HEADER)):
        response = stream(_waiting_body(relay, builder, admitted, st), st.settings)
        response.headers.update(headers)
        return response
    try:
        first = await first_event(request, relay)
    except ClientClosedRequest:
        return Response(status_code=499)
    if req.stream:
        response = stream(_body(relay, builder, first), st.settings)
        response.headers.update(headers)
        return response
    try:  # a client that leaves before the whole answer is in cancels it, as a stream's does
        out = await until_disconnect(request, _collect(relay, builder, first))
    except ClientClosedRequest:
        return Response(status_code=499)
    return JSONResponse(out, headers=headers)


async def _owned(st: GatewayState, response_id: str, tenant: Tenant) -> StoredJob:
    return await durable.owned(st, response_id, tenant, api=API)


@router.get("/v1/responses/{response_id}", response_model=None)
async def retrieve(
    response_id: str,
    request: Request,
    st: StateDep,
    tenant: TenantDep,
    stream_: Annotated[bool, Query(alias="stream")] = False,
    starting_after: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """A stored response now, or its stream again after event ``starting_after``."""
    rec = await _owned(st, response_id, tenant)
    if not stream_:
        return JSONResponse(await _snapshot(st, rec))
    _, builder = await _stored(st, rec)
    try:
        relay, first = await until_disconnect(request, durable.follow(st, rec, 0))
    except ClientClosedRequest:
        return Response(status_code=499)
    after = -1 if starting_after is None else starting_after
    if first is None:  # it ended without a payload (cancelled while queued): its log says
        events = replay(builder, await st.store.records.read_log(rec.id))
        return stream(_frames_only(events, after), st.settings)
    return stream(_body(relay, builder, first, after), st.settings)


async def _frames_only(events: list[StreamEvent], after: int) -> AsyncIterator[bytes]:
    yield b"".join(e.frame() for e in events if e.sequence_number > after)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel(response_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel a response: queued, it never runs; running, its engine request is aborted."""
    rec = await _owned(st, response_id, tenant)
    if rec.status in durable.ENDED:
        return await _snapshot(st, rec)
    never_ran = await st.store.jobs.cancel(rec.spec())
    state = "queued" if never_ran else "running"
    logger.info("job %s: cancelled on request (%s)", rec.id, state)
    out = await _snapshot(st, await st.store.records.stored(rec.id) or rec)
    # Its worker may not have ended it yet, or ended it in its own words (an abort reaches
    # the job as a stop): what this call did is cancel it.
    out["status"] = "cancelled"
    return out


@router.delete("/v1/responses/{response_id}")
async def delete(response_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Delete a stored response (cancelled first if it still runs)."""
    await durable.forget(st, await _owned(st, response_id, tenant))
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(
    response_id: str,
    st: StateDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """The response's own input items (not those of its ``previous_response_id`` chain),
    in OpenAI's cursor pages; each with an id (its own, or ``item_<response>_<n>``)."""
    rec = await _owned(st, response_id, tenant)
    kept, _ = await _stored(st, rec)
    items = [_listed(item, f"item_{rec.id[5:]}_{i}") for i, item in enumerate(kept["input"])]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return page(items, limit)


def _listed(item: dict[str, Any], default_id: str) -> dict[str, Any]:
    """An input item as ``input_items`` lists it: an id, a status, a message's content as
    parts (``input_text``; ``output_text`` for the assistant's)."""
    out = {"id": default_id, "status": "completed", **item}
    if item.get("type") == "message" and isinstance(item.get("content"), str):
        kind = "output_text" if item.get("role") == "assistant" else "input_text"
        out["content"] = [{"type": kind, "text": item["content"]}]
    return out
