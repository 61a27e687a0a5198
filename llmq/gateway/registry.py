"""What the gateway knows about engines: live worker heartbeats, refreshed in the background."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from llmq.shared.protocol import WorkerInfo
from llmq.shared.store import Store, log_reaped
from llmq.shared.tasks import stop_if_cancelled

logger = logging.getLogger(__name__)


class WorkerRegistry:
    """A cached view of ``llmq:workers``; admission reads it on every request without I/O.

    Each refresh first runs the reaper: a worker whose heartbeat expired has its started
    jobs ended with ``worker_lost`` and their places reclaimed (idempotent, any process).

    Stale by at most REGISTRY_REFRESH_S. Capacity only gates admission: the bound itself is
    enforced atomically in Redis, so two gateways with the same view admit the same total.
    """

    def __init__(self, store: Store, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self.workers: list[WorkerInfo] = []
        self.redis_ok = False
        self.redis_error: RedisError | None = None  # the last refresh's, while not redis_ok
        self.updated_at = 0.0

    async def refresh(self) -> None:
        try:
            log_reaped(logger, *await self._store.reap())
            self.workers = await self._store.live_workers()
            self.redis_ok = True
            self.redis_error = None
        except RedisError as exc:
            stop_if_cancelled()
            if self.redis_ok:
                logger.warning("cannot read worker heartbeats: %s", exc)
            self.redis_ok = False
            self.redis_error = exc
            self.workers = []
        self.updated_at = time.monotonic()

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    def ready(self) -> list[WorkerInfo]:
        return [w for w in self.workers if w.engine_ready]

    def capacity(self, model: str | None = None) -> int:
        """Σ MAX_ACTIVE over live workers with a ready engine (serving ``model``)."""
        return sum(w.max_active for w in self.ready() if model is None or model in w.models)

    def max_model_len(self, model: str) -> int:
        """The smallest context length of the ready engines serving ``model`` (0: unknown)."""
        lengths = [w.max_model_len for w in self.ready() if model in w.models and w.max_model_len]
        return min(lengths, default=0)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for w in self.workers:
            for m in w.models:
                seen.setdefault(m, None)
        return list(seen)

    def auto_tools(self, model: str) -> bool:
        """False when a ready engine serving ``model`` said it refuses tool_choice "auto"
        (a job may land on any of them); True otherwise, unknown included."""
        return not any(w.auto_tools is False for w in self.ready() if model in w.models)
