"""Admission before work: readiness, model, then the atomic bound in Redis."""

from __future__ import annotations

import math

from llmq.gateway.registry import WorkerRegistry
from llmq.gateway.tenant import Tenant
from llmq.shared.errors import (
    ConcurrencyLimitExceeded,
    DeadlineUnattainable,
    EngineUnavailable,
    ModelNotFound,
    QueueFull,
    QueueTimeout,
    QueueUnavailable,
    RateLimitExceeded,
    ServerBusy,
    ServiceError,
    WrongModelKind,
)
from llmq.shared.prefix import signature
from llmq.shared.protocol import Api, JobSpec, StoredJob
from llmq.shared.queue.jobs import AdmitResult, AdmitStatus, QueueTerms, TenantLimits
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings

# How long an admitted job may hold its place past QUEUE_TIMEOUT_S before the bound
# forgets it (its gateway died); a started job is re-armed by its worker.
_HOLD_GRACE_S = 5.0


def admission_limit(settings: Settings, capacity: int, model: str = "") -> int:
    """The model's N may grow to C + its queue places in queue mode, to C in reject mode
    (C: the slots of the live ready workers serving it)."""
    if settings.queue_mode == "queue":
        return capacity + settings.queue_max_for(model)
    return capacity


class Admission:
    def __init__(self, settings: Settings, store: Store, registry: WorkerRegistry) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry

    def check_ready(self, model: str) -> int:
        """Capacity for ``model`` (a served name: aliases resolved); 404 for a model no
        worker serves or served lately, 503 when none of its engines is ready, unless it
        is one of SCALE_TO_ZERO_MODELS: then 0, and the job waits in the queue (its queue
        places) for the worker an autoscaler starts."""
        reg = self._registry
        if not reg.redis_ok:
            raise QueueUnavailable.because(reg.redis_error)
        if not reg.known(model):
            if not any(w.models for w in reg.workers):  # no engine has said what it serves
                raise EngineUnavailable("no live worker with a ready engine; try again shortly")
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        capacity = reg.capacity(model)
        if capacity == 0 and model not in self._settings.scale_to_zero_models:
            raise EngineUnavailable(f"no live worker with a ready engine serves `{model}` now")
        return capacity

    def check_kind(self, model: str, api: Api) -> None:
        """400 when ``model`` does not serve ``api`` (embeddings on a generate model, or
        chat, Responses or completions on an embedding model), as its engines answered the
        worker's probe (heartbeat). A model whose kind no live worker knows yet passes:
        its worker refuses the job with the same error."""
        kind = self._registry.kind(model)
        if kind is not None and not kind.serves(api):
            raise WrongModelKind(kind.refusal(model, api), param="model")

    async def admit(
        self,
        spec: JobSpec,
        capacity: int,
        tenant: Tenant,
        record: StoredJob | None = None,
        idempotency: tuple[str, str] | None = None,
        messages: str = "",
    ) -> AdmitResult:
        """Try to admit and enqueue atomically (the tenant's limits, then the model's bound),
        with a stored job's record and its Idempotency-Key (see ``Jobs.admit``).

        ``ratelimit_headers(result, tenant)`` describes the key's budget either way; then
        ``raise_unless_admitted`` turns a refusal into its 429.
        """
        s = self._settings
        result = await self._store.jobs.admit(
            spec,
            limit=admission_limit(s, capacity, spec.model),
            hold_s=s.queue_timeout_s + _HOLD_GRACE_S,
            expire_s=s.queue_timeout_s,
            tenant=TenantLimits(tenant.max_concurrent, tenant.rpm),
            record=record,
            messages=messages,
            idempotency=idempotency,
            queue=QueueTerms(
                capacity=capacity,
                timeout_s=s.queue_timeout_s if s.queue_mode == "queue" and s.queue_predict else 0,
                displace=s.queue_mode == "queue" and s.queue_fair_share,
                due_s=s.queue_timeout_s,
            ),
            prefix=signature(spec.body, spec.model, self._store.sealer.prefix_key)
            if s.prefix_affinity
            else (),
        )
        return result

    def raise_unless_admitted(
        self, result: AdmitResult, spec: JobSpec, capacity: int, tenant: Tenant
    ) -> None:
        """429 ``concurrency_limit_exceeded`` / ``rate_limit_exceeded`` (the key's limits),
        ``queue_full`` (queue mode) or ``server_busy`` (reject mode)."""
        if not result.admitted:
            raise self._refusal(result, spec, capacity, tenant)

    def _refusal(
        self, result: AdmitResult, spec: JobSpec, capacity: int, tenant: Tenant
    ) -> ServiceError:
        s = self._settings
        if result.status == AdmitStatus.CONCURRENCY:
            return ConcurrencyLimitExceeded(
                f"key {tenant.name!r} already has {tenant.max_concurrent} request(s) queued "
                "or running (its max_concurrent); retry when one ends",
                retry_after_s=s.retry_after_s,
            )
        if result.status in (AdmitStatus.RPM, AdmitStatus.TPM):
            what = "requests" if result.status == AdmitStatus.RPM else "tokens"
            return RateLimitExceeded(
                f"key {tenant.name!r} reached its {what} per minute; retry later",
                retry_after_s=max(1, math.ceil(result.retry_after_ms / 1000)),
            )
        if result.status == AdmitStatus.DUPLICATE:  # 96 random bits: never, but not silently
            return ServiceError(f"job id {spec.id} already exists; retry")
        # When a place or slot is expected to free (whole seconds, at least 1), from the
        # model's service time and what runs; RETRY_AFTER_S before any job completed.
        retry = max(1, math.ceil(result.retry_after_ms / 1000)) if result.retry_after_ms else None
        if result.status == AdmitStatus.DEADLINE:
            objective = spec.ttft_objective_ms
            return DeadlineUnattainable(
                f"`{spec.model}` would not give this request its first token within its "
                f"objective of {objective} ms (predicted "
                f"{objective + result.retry_after_ms} ms: {max(0, result.eta_ms)} ms in the "
                "queue and the model's time to first token); retry later, or send "
                "X-Deadline-Policy: best-effort to wait anyway",
                retry_after_s=retry or s.retry_after_s,
            )
        if result.status == AdmitStatus.WAIT:
            return QueueTimeout(
                f"`{spec.model}` would not start this request within {s.queue_timeout_s:g}s "
                f"(expected wait {result.eta_ms / 1000:.1f}s); retry later",
                retry_after_s=retry or s.retry_after_s,
            )
        if s.queue_mode == "queue":
            return QueueFull(
                f"queue full for `{spec.model}` ({result.in_system} jobs admitted); retry later",
                retry_after_s=retry or s.retry_after_s,
            )
        return ServerBusy(
            f"all {capacity} slots of `{spec.model}` busy; retry later",
            retry_after_s=retry or s.retry_after_s,
        )


def _duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def ratelimit_headers(result: AdmitResult, tenant: Tenant) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the key's limited dimensions."""
    headers = {}
    for kind, limit, left, reset in (
        ("requests", tenant.rpm, result.rpm_left, result.rpm_reset_ms),
        ("tokens", tenant.tpm, result.tpm_left, result.tpm_reset_ms),
    ):
        if limit > 0:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, left))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    return headers
