"""HTTP routes: the OpenAI surface plus /health and /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.types import Receive

from llmq.gateway.admission import ratelimit_headers
from llmq.gateway.auth import TenantDep
from llmq.gateway.body import check_max_tokens, parse_chat_body
from llmq.gateway.relay import JobRelay, Timings
from llmq.gateway.state import GatewayState, StateDep
from llmq.gateway.tenant import Tenant
from llmq.shared.chat import ChatCompletionRequest, band_for, to_job_spec
from llmq.shared.errors import (
    ClientClosedRequest,
    EngineUnavailable,
    QueueUnavailable,
    ServiceError,
    ShuttingDown,
)
from llmq.shared.protocol import Event

logger = logging.getLogger(__name__)
router = APIRouter()
_HEALTH_PING_S = 0.5
T = TypeVar("T")


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then raise ClientClosedRequest)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
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


async def _open_relay(
    st: GatewayState,
    request: Request,
    body: ChatCompletionRequest,
    tenant: Tenant,
    timings: Timings,
) -> tuple[JobRelay, Event]:
    job_id: str = request.state.request_id
    band = band_for(body, tenant.band)
    spec = to_job_spec(body, job_id, tenant=tenant.name, band=band, tpm=tenant.tpm)
    capacity = st.admission.check_ready(spec.model)
    check_max_tokens(body, st.settings.max_tokens_cap or st.registry.max_model_len(spec.model))
    sub = await st.subs.subscribe(job_id)  # before enqueue: pub/sub keeps no backlog
    relay = JobRelay(spec, sub, st.subs, st.store, st.settings, st.metrics, timings)
    try:
        result = await st.admission.admit(spec, capacity, tenant)
        # On every answer from here on, refusals included (added by the middleware).
        request.state.ratelimit_headers = ratelimit_headers(result, tenant)
        st.admission.raise_unless_admitted(result, spec, capacity, tenant)
        timings.admitted = time.monotonic()
    except BaseException:
        await st.subs.unsubscribe(sub)
        raise
    logger.info("job %s: admitted (model=%s stream=%s)", job_id, spec.model, spec.stream)
    try:
        first = await until_disconnect(request, relay.open())
    except BaseException as exc:
        gone = isinstance(exc, ClientClosedRequest | asyncio.CancelledError)
        if gone:
            logger.info("job %s: client left before the first token", job_id)
        await relay.close(client_gone=gone)
        raise
    return relay, first


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, st: StateDep, tenant: TenantDep) -> Response:
    """OpenAI's chat completions. The body is read here, not by FastAPI (see gateway.body)."""
    timings = Timings()
    body = parse_chat_body(await request.body(), st.settings)
    st.metrics.tenant_requests.labels(tenant.name).inc()
    if st.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another replica")
    try:
        relay, first = await _open_relay(st, request, body, tenant, timings)
    except ClientClosedRequest:
        return Response(status_code=499)
    if body.stream:
        return EventSourceResponse(
            relay.sse_body(first),
            sep="\n",
            ping=15,
            headers={"Cache-Control": "no-cache"},
            # A client that stops reading: the send blocks, and after this the stream ends
            # and its job is cancelled (the slot must not wait on a stalled socket).
            send_timeout=st.settings.client_send_timeout_s,
        )
    await relay.close(client_gone=False)  # the result is in: nothing left to cancel
    return JSONResponse(relay.completion(first))


@router.get("/v1/models")
async def list_models(st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    if not st.registry.redis_ok:
        raise QueueUnavailable("cannot read worker heartbeats from Redis")
    created = int(min((w.started_at for w in st.registry.workers), default=time.time()))
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "llmq"}
            for m in st.registry.models()
        ],
    }


@router.get("/health")
async def health(st: StateDep) -> JSONResponse:
    try:  # bounded: /health answers within a second even while Redis is frozen
        async with asyncio.timeout(_HEALTH_PING_S):
            redis_ok = bool(await st.redis.ping())
    except (RedisError, TimeoutError):
        redis_ok = False
    ready = len(st.registry.ready())
    body: dict[str, Any] = {
        "status": "ok",
        "redis": redis_ok,
        "live_workers": len(st.registry.workers),
        "ready_workers": ready,
        "capacity": st.registry.capacity(),
        "draining": st.draining,
    }
    problem: ServiceError | None = None
    if st.draining:
        problem = ShuttingDown("draining")
    elif not redis_ok:
        problem = QueueUnavailable("redis unreachable")
    elif ready == 0:
        problem = EngineUnavailable("no live worker with a ready engine")
    if problem is None:
        return JSONResponse(body)
    body.update(status="unavailable", reason=problem.message)
    return JSONResponse(body, status_code=problem.status, headers=problem.headers())
