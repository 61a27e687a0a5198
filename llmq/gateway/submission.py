"""A request becomes a job: what every API (chat completions, Responses) does the same way.

``submit``: the model's readiness and the request's caps (before anything is queued), the
subscription to the job's events (before the enqueue: pub/sub keeps no backlog), the atomic
admission and its refusals (429/503 with ``Retry-After``, ``x-ratelimit-*`` headers), the
admission metrics. ``first_event``: the wait for the job's first payload event while the
client may leave (then the job is cancelled). Each API builds its ``JobSpec`` and its
answer; this module is the path between.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from opentelemetry.trace import INVALID_SPAN, Span, StatusCode

from llmq.gateway.admission import ratelimit_headers
from llmq.gateway.body import check_max_tokens, check_stored_size, check_tools
from llmq.gateway.fallbacks import BUSY, Candidate, candidates
from llmq.gateway.relay import JobRelay, Timings, until_disconnect
from llmq.gateway.state import GatewayState
from llmq.gateway.tenant import Tenant
from llmq.shared import tracing
from llmq.shared.chat import ChatCompletionRequest
from llmq.shared.completions import CompletionRequest
from llmq.shared.errors import (
    ClientClosedRequest,
    IdempotencyKeyReused,
    InvalidRequest,
    ServiceError,
    ShuttingDown,
)
from llmq.shared.protocol import MAX_OBJECTIVE_MS, Api, Event, JobSpec, StoredJob
from llmq.shared.queue.jobs import AdmitResult, AdmitStatus
from llmq.shared.settings import Settings

logger = logging.getLogger(__name__)


class Attach(Exception):
    """The Idempotency-Key names an earlier job of the same body: answer with that one."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def arrived(st: GatewayState, tenant_name: str) -> None:
    """A request of ``tenant_name`` arrived (every API): counted, refused while draining."""
    st.metrics.tenant_requests.labels(tenant_name).inc()
    if st.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another replica")


async def submit(
    st: GatewayState,
    request: Request,
    spec: JobSpec,
    body: ChatCompletionRequest | CompletionRequest | None,
    tenant: Tenant,
    timings: Timings,
    *,
    record: StoredJob | None = None,
    kept: str = "",
    idempotency: tuple[str, str] | None = None,
    body_digests: Sequence[str] = (),
) -> tuple[JobRelay, AdmitResult]:
    """Check, subscribe, admit. ``body``: the chat or completions request the job runs
    (its caps are checked; None: an embeddings job, checked by its route); ``record``: a
    stored job's record; ``kept``: what a stored job keeps of its request (sealed:
    ``Store``); ``idempotency``: (key digest, body digest) of an
    Idempotency-Key (``Attach`` when it names an earlier job of the same body)."""
    spec = with_objective(spec, request, tenant, st.settings)
    span = _span(spec, body, tenant, st.settings.trace_content)
    if tracing.enabled():  # the job (and a stored job's record) carries the request's trace
        spec = spec.model_copy(update={"trace": tracing.carrier(span)})
        if record is not None:
            record = record.model_copy(update={"trace": spec.trace})
    requested = spec.model
    try:
        ready = candidates(
            spec,
            st.settings.model_fallbacks.get(spec.model, ()),
            record,
            lambda job: _capacity(st, job, body),
        )
        request.state.model = ready[0].spec.model  # a known model: the metrics' label
        sub = await st.subs.subscribe(spec.id)  # before enqueue: pub/sub keeps no backlog
    except BaseException as exc:
        end_span(span, exc)
        raise
    relay = JobRelay(spec, sub, st.subs, st.store, st.settings, st.metrics, timings, span=span)
    try:
        result, chosen = await _admit(st, ready, tenant, idempotency, kept)
        spec = relay.spec = chosen.spec
        capacity = chosen.capacity
        request.state.model = spec.model
        if spec.model != requested and result.admitted:
            _fell_back(st, request, span, requested, spec.model, ready[0].spec.model)
        _admitted(span, result)
        if result.status == AdmitStatus.IDEMPOTENT:
            prior_id, _, digest = result.prior.partition(" ")
            if idempotency is None or digest not in body_digests:  # any key's: rotations
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was sent before with a different body"
                )
            raise Attach(prior_id)
        # On every answer from here on, refusals included (added by the middleware).
        request.state.ratelimit_headers = ratelimit_headers(result, tenant)
        if result.status == AdmitStatus.DEADLINE:
            st.metrics.deadline(spec.model, spec.band.value, "unattainable")
        st.admission.raise_unless_admitted(result, spec, capacity, tenant)
        timings.admitted = time.monotonic()
        st.metrics.admissions.labels(spec.model).inc()
        request.state.request_id = spec.id  # a job exists now: x-request-id is its id
    except BaseException as exc:
        await st.subs.unsubscribe(sub)
        end_span(span, exc)
        raise
    logger.info(
        "job %s: admitted (api=%s model=%s stream=%s store=%s)",
        spec.id,
        spec.api,
        spec.model,
        spec.stream,
        spec.stored,
    )
    return relay, result


def _capacity(
    st: GatewayState, spec: JobSpec, body: ChatCompletionRequest | CompletionRequest | None
) -> int:
    """The model's capacity, after what it and the request's caps allow (refusals raise),
    before anything is queued."""
    capacity = st.admission.check_ready(spec.model)
    st.admission.check_kind(spec.model, spec.api)
    if body is None:
        return capacity
    check_max_tokens(body, st.settings.max_tokens_cap or st.registry.max_model_len(spec.model))
    if isinstance(body, ChatCompletionRequest):
        check_tools(body, st.registry.auto_tools(spec.model))
    if spec.stored:
        check_stored_size(body, st.settings.store_max_tokens)
    return capacity


async def _admit(
    st: GatewayState,
    ready: list[Candidate],
    tenant: Tenant,
    idempotency: tuple[str, str] | None,
    kept: str,
) -> tuple[AdmitResult, Candidate]:
    """Admitted by the first candidate that takes the job (``gateway.fallbacks``: a busy
    model's refusal sends it on to the next); none: the first one's refusal."""
    first: tuple[AdmitResult, Candidate] | None = None
    for c in ready:
        result = await st.admission.admit(c.spec, c.capacity, tenant, c.record, idempotency, kept)
        if result.status not in BUSY:
            return result, c
        first = first or (result, c)
    assert first is not None, "there is always a candidate"
    return first


def _fell_back(
    st: GatewayState, request: Request, span: Span, requested: str, served: str, first: str
) -> None:
    """Say it (header, span, metric, log): the request's model could not take it."""
    reason = "busy" if first == requested else "unavailable"
    request.state.fallback = f"{requested} -> {served}"
    st.metrics.fallbacks.labels(requested, served, reason).inc()
    span.set_attribute("llmq.fallback", request.state.fallback)
    logger.info("request for %s sent to %s (%s)", requested, served, reason)


OBJECTIVE_HEADER = "x-ttft-objective-ms"
POLICY_HEADER = "x-deadline-policy"
_POLICIES = {"drop": False, "best-effort": True}


def with_objective(spec: JobSpec, request: Request, tenant: Tenant, settings: Settings) -> JobSpec:
    """The job with its time-to-first-token objective: the request's X-TTFT-Objective-Ms,
    else its key's, else its band's (TTFT_OBJECTIVE_MS); none: as before. X-Deadline-Policy:
    ``drop`` (the default: refused when it cannot be met, dropped when it passes) or
    ``best-effort`` (ordered by it, never refused for it)."""
    raw = request.headers.get(OBJECTIVE_HEADER)
    objective = tenant.ttft_objective_ms or settings.ttft_objective_ms.get(spec.band.value, 0)
    if raw is not None:
        try:
            objective = int(raw.strip())
        except ValueError:
            objective = -1
        if not 0 < objective <= MAX_OBJECTIVE_MS:
            raise InvalidRequest(
                f"X-TTFT-Objective-Ms must be a whole number of milliseconds, "
                f"1..{MAX_OBJECTIVE_MS}",
                param=OBJECTIVE_HEADER,
            )
    policy = (request.headers.get(POLICY_HEADER) or "drop").strip().lower()
    if policy not in _POLICIES:
        raise InvalidRequest("X-Deadline-Policy must be drop or best-effort", param=POLICY_HEADER)
    if not objective:
        return spec
    return spec.model_copy(
        update={"ttft_objective_ms": objective, "best_effort": _POLICIES[policy]}
    )


_OPERATIONS = {
    Api.CHAT: "chat",
    Api.RESPONSES: "chat",
    Api.COMPLETIONS: "text_completion",
    Api.EMBEDDINGS: "embeddings",
}


def _span(
    spec: JobSpec,
    body: ChatCompletionRequest | CompletionRequest | None,
    tenant: Tenant,
    content: bool,
) -> Span:
    """The request's ``<operation> <model>`` span (GenAI semantic conventions), a child of
    the server span (a client's ``traceparent`` included); ended by the relay, or here on a
    refusal. The key's name, never its secret; the prompt only with TRACE_CONTENT. Tracing
    off: the no-op span, nothing built."""
    if not tracing.enabled():
        return INVALID_SPAN
    operation = _OPERATIONS[spec.api]
    attributes: dict[str, Any] = {
        tracing.OPERATION: operation,
        tracing.SYSTEM: "vllm",
        tracing.REQUEST_MODEL: spec.model,
        tracing.REQUEST_STREAM: spec.stream,
        tracing.RESPONSE_ID: spec.id,
        "llmq.api": spec.api.value,
        "llmq.key": tenant.name,
        "llmq.band": spec.band.value,
        "llmq.stored": spec.stored,
    }
    if spec.ttft_objective_ms:
        attributes["llmq.ttft_objective_ms"] = spec.ttft_objective_ms
        attributes["llmq.deadline_policy"] = "best-effort" if spec.best_effort else "drop"
    limit = (body.max_tokens or body.max_completion_tokens) if body is not None else None
    if limit:
        attributes[tracing.REQUEST_MAX_TOKENS] = limit
    if content:
        attributes[tracing.INPUT_MESSAGES] = json.dumps(
            spec.body.get("messages") or spec.body.get("prompt") or spec.body.get("input")
        )
    return tracing.tracer().start_span(f"{operation} {spec.model}", attributes=attributes)


def _admitted(span: Span, result: AdmitResult) -> None:
    if result.status == AdmitStatus.ADMITTED:
        span.add_event("admitted", {"llmq.queue.position": result.position,
                                    "llmq.queue.eta_ms": result.eta_ms})  # fmt: skip
        span.set_attribute("llmq.queue.position", result.position)
        if result.eta_ms >= 0:
            span.set_attribute("llmq.queue.eta_ms", result.eta_ms)


def end_span(span: Span, exc: BaseException | None = None) -> None:
    """End the request's span; ``exc``: why it ended early (its error type: the OpenAI
    ``code`` of a refusal, ``client_closed_request``, or the exception's class)."""
    if exc is not None and not isinstance(exc, Attach):
        if isinstance(exc, ServiceError):
            kind = exc.code or type(exc).__name__
        elif isinstance(exc, asyncio.CancelledError):
            kind = "client_closed_request"
        else:
            kind = type(exc).__name__
        span.set_attribute(tracing.ERROR_TYPE, kind)
        span.set_status(StatusCode.ERROR, kind)
    span.end()


async def first_event(request: Request, relay: JobRelay) -> Event:
    """The job's first payload event; the job is cancelled if the client leaves first
    (ClientClosedRequest) or the wait fails."""
    try:
        return await until_disconnect(request, relay.open())
    except BaseException as exc:
        gone = isinstance(exc, ClientClosedRequest | asyncio.CancelledError)
        if isinstance(exc, ServiceError) and not relay.error:
            relay.error = str(exc.code or exc.status)  # the request's span says why
        if gone:
            logger.info("job %s: client left before the first token", relay.spec.id)
        await relay.close(client_gone=gone)
        raise
