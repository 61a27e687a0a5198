"""HTTP routes: chat completions, /v1/models and /health (stored completions: durable and
stored; files and batches: batch_api). Metrics are served on their own port (app)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from llmq.gateway import durable, queued
from llmq.gateway.auth import TenantDep
from llmq.gateway.body import (
    parse_chat_body,
)
from llmq.gateway.relay import JobRelay, Timings
from llmq.gateway.state import GatewayState, StateDep
from llmq.gateway.submission import Attach, arrived, first_event, submit
from llmq.gateway.tenant import Tenant
from llmq.shared.chat import ChatCompletionRequest, band_for, new_job_id, to_job_spec
from llmq.shared.errors import (
    ClientClosedRequest,
    EngineUnavailable,
    InvalidRequest,
    QueueUnavailable,
    ServiceError,
    ShuttingDown,
)
from llmq.shared.protocol import Event, StoredJob
from llmq.shared.queue.jobs import AdmitResult

logger = logging.getLogger(__name__)
router = APIRouter()
_HEALTH_PING_S = 0.5
_MAX_IDEMPOTENCY_KEY = 255


def _idempotency(request: Request, digests: list[str]) -> tuple[str, str] | None:
    """(key digest, body digest) of the request's Idempotency-Key, if it has one
    (``digests``: the body's, ``Sealer.digests``, the current one first)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= _MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key is 1..{_MAX_IDEMPOTENCY_KEY} characters")
    return hashlib.sha256(key.encode()).hexdigest(), digests[0]


async def _open_relay(
    st: GatewayState,
    request: Request,
    body: ChatCompletionRequest,
    tenant: Tenant,
    timings: Timings,
    idempotency: tuple[str, str] | None,
    updates: bool = False,
    body_digests: Sequence[str] = (),
) -> tuple[JobRelay, Event | None, AdmitResult]:
    """Admit the request; then (unless ``updates``: the stream starts now and tells the
    client where it waits) wait for its first event."""
    band = band_for(body.service_tier, tenant.band)
    body.model = st.registry.resolve(body.model)  # MODEL_ALIASES: the served name
    # An Idempotency-Key implies store: a retry must find the job's events.
    spec = to_job_spec(
        body, new_job_id(), tenant=tenant.name, band=band, tpm=tenant.tpm, store=bool(idempotency)
    )
    record = None
    if spec.stored:
        record = StoredJob.of(spec, idempotency[1] if idempotency else "", body.metadata)
    # The messages are kept only when the client asked to store the completion (not for an
    # Idempotency-Key alone): the stored-completion API lists them.
    kept = json.dumps(spec.body["messages"], separators=(",", ":")) if body.store else ""
    relay, result = await submit(
        st, request, spec, body, tenant, timings, record=record, kept=kept,
        idempotency=idempotency, body_digests=body_digests,
    )  # fmt: skip
    if updates:
        return relay, None, result
    return relay, await first_event(request, relay), result


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, st: StateDep, tenant: TenantDep) -> Response:
    """OpenAI's chat completions. The body is read here, not by FastAPI (see gateway.body)."""
    timings = Timings()
    raw = await request.body()
    body = parse_chat_body(raw, st.settings)
    digests = st.store.sealer.digests(raw) if "idempotency-key" in request.headers else []
    idempotency = _idempotency(request, digests)
    arrived(st, tenant.name)
    updates = body.stream and queued.wants_updates(request.headers.get(queued.HEADER))
    try:
        relay, first, admitted = await _open_relay(
            st, request, body, tenant, timings, idempotency, updates, digests
        )
    except ClientClosedRequest:
        return Response(status_code=499)
    except Attach as attach:
        logger.info("Idempotency-Key: attached to job %s", attach.job_id)
        request.state.request_id = attach.job_id
        return await durable.attach(st, request, tenant, attach.job_id)
    if first is None:  # X-Queue-Updates
        return queued.respond(relay, admitted, st.registry)
    return await relay.respond(first)


@router.get("/v1/models")
async def list_models(st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """What live workers serve (base models, extra served names, LoRA adapters with their
    ``parent``), then the MODEL_ALIASES whose model is served (``root``: that model)."""
    reg = st.registry
    if not reg.redis_ok:
        raise QueueUnavailable("cannot read worker heartbeats from Redis")
    created = int(min((w.started_at for w in reg.workers), default=time.time()))
    cards = reg.cards()
    data: list[dict[str, Any]] = []
    for card in cards.values():
        entry = {"id": card.id, "object": "model", "created": created}
        entry["owned_by"] = card.owned_by or "llmq"
        if card.parent:
            entry["parent"] = card.parent
        data.append(entry)
    for alias, target in reg.aliases.items():
        if target in cards and alias not in cards:
            owner = cards[target].owned_by or "llmq"
            data.append(
                {"id": alias, "object": "model", "created": created, "owned_by": owner,
                 "root": target}
            )  # fmt: skip
    return {"object": "list", "data": data}


@router.get("/health")
async def health(st: StateDep, scope: Literal["service", "gateway"] = "service") -> JSONResponse:
    """200 when this gateway can serve: Redis answers, it is not draining and (``scope``
    ``service``, the default) a worker reports a ready engine. ``scope=gateway`` leaves
    the engines out: a Kubernetes readiness probe, so that gateways stay in their Service
    while a model is scaled to zero (its requests queue and wake the autoscaler)."""
    try:  # bounded: /health answers within a second even while Redis is frozen
        async with asyncio.timeout(_HEALTH_PING_S):
            redis_ok = await st.store.readings.ping()
    except (RedisError, TimeoutError):
        redis_ok = False
    ready = len(st.registry.ready())
    body: dict[str, Any] = {
        "status": "ok",
        "redis": redis_ok,
        "live_workers": len(st.registry.workers),
        "ready_workers": ready,
        "capacity": st.registry.capacity(),
        "models": {m: st.registry.capacity(m) for m in st.registry.models()},
        "draining": st.draining,
    }
    problem: ServiceError | None = None
    if st.draining:
        problem = ShuttingDown("draining")
    elif not redis_ok:
        problem = QueueUnavailable("redis unreachable")
    elif ready == 0 and scope == "service":
        problem = EngineUnavailable("no live worker with a ready engine")
    if problem is None:
        return JSONResponse(body)
    body.update(status="unavailable", reason=problem.message)
    return JSONResponse(body, status_code=problem.status, headers=problem.headers())
