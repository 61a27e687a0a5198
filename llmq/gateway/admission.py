"""Admission before work: readiness, model, then the atomic bound in Redis."""

from __future__ import annotations

import time

from llmq.gateway.registry import WorkerRegistry
from llmq.shared.errors import (
    EngineUnavailable,
    ModelNotFound,
    QueueFull,
    QueueUnavailable,
    ServerBusy,
    ServiceError,
)
from llmq.shared.protocol import JobSpec
from llmq.shared.settings import Settings
from llmq.shared.store import Store

# How long an admitted job may hold its place past QUEUE_TIMEOUT_S before the bound
# forgets it (its gateway died); a started job is re-armed by its worker.
_HOLD_GRACE_S = 5.0


def admission_limit(settings: Settings, capacity: int) -> int:
    """N may grow to C + QUEUE_MAX in queue mode, to C in reject mode."""
    if settings.queue_mode == "queue":
        return capacity + settings.queue_max
    return capacity


class Admission:
    def __init__(self, settings: Settings, store: Store, registry: WorkerRegistry) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry

    def check_ready(self, model: str) -> int:
        """Capacity for ``model``; raises 503 when no engine is ready, 404 for unknown models."""
        reg = self._registry
        if not reg.redis_ok:
            raise QueueUnavailable("the job queue is unreachable; retry")
        if not reg.ready():
            raise EngineUnavailable("no live worker with a ready engine; try again shortly")
        if model not in reg.models():
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        capacity = reg.capacity(model)
        if capacity == 0:
            raise EngineUnavailable(f"no ready engine serves `{model}` right now")
        return capacity

    async def admit(self, spec: JobSpec, capacity: int) -> float:
        """Admit and enqueue atomically; returns the admission time (monotonic).

        Raises 429 ``queue_full`` (queue mode) or ``server_busy`` (reject mode).
        """
        s = self._settings
        result = await self._store.admit(
            spec,
            limit=admission_limit(s, capacity),
            hold_s=s.queue_timeout_s + _HOLD_GRACE_S,
            expire_s=s.queue_timeout_s,
        )
        if result.admitted:
            return time.monotonic()
        if result.duplicate:  # 96 random bits: practically never, but never silently
            raise ServiceError(f"job id {spec.id} already exists; retry")
        if s.queue_mode == "queue":
            raise QueueFull(
                f"queue full ({result.in_system} jobs admitted); retry later",
                retry_after_s=s.retry_after_s,
            )
        raise ServerBusy(f"all {capacity} slots busy; retry later", retry_after_s=s.retry_after_s)
