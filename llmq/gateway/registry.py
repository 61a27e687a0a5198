"""What the gateway knows about engines: live worker heartbeats, refreshed in the background."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from llmq.shared.protocol import ModelCard, ModelKind, WorkerInfo
from llmq.shared.queue.failover import OutageReaper
from llmq.shared.queue.store import Store
from llmq.shared.tasks import stop_if_cancelled

logger = logging.getLogger(__name__)


class WorkerRegistry:
    """A cached view of ``llmq:workers``; admission reads it on every request without I/O.

    Each refresh first runs the reaper: a worker whose heartbeat expired has its started
    jobs ended with ``worker_lost`` and their places reclaimed (idempotent, any process).

    Stale by at most REGISTRY_REFRESH_S. Capacity only gates admission: the bound itself is
    enforced atomically in Redis, so two gateways with the same view admit the same total.

    Models: what live workers serve (their engines' ``/v1/models``), plus those a worker
    served within MODEL_MEMORY_S (``llmq:models``): a model whose last worker died is still
    known (503 engine_unavailable), not unknown (404). MODEL_ALIASES maps public names to
    served ones. SCALE_TO_ZERO_MODELS are always known: an autoscaler starts their workers
    when their requests wait.
    """

    def __init__(
        self,
        store: Store,
        refresh_s: float,
        aliases: dict[str, str] | None = None,
        memory_s: float = 3600.0,
        reap_grace_s: float = 3.0,
        scale_to_zero: tuple[str, ...] = (),
    ) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self.aliases = dict(aliases or {})
        self._memory_s = memory_s
        self.scale_to_zero = scale_to_zero
        self.workers: list[WorkerInfo] = []
        self.remembered: list[str] = []  # served within MODEL_MEMORY_S, live or not
        self.redis_ok = False
        self.redis_error: RedisError | None = None  # the last refresh's, while not redis_ok
        self.updated_at = 0.0
        self._reaper = OutageReaper(store.workers, reap_grace_s, logger)

    async def refresh(self) -> None:
        try:
            await self._reaper.reap()
            readings = self._store.readings
            self.workers = await readings.live_workers()
            since_ms = int((time.time() - self._memory_s) * 1000)
            await self._store.workers.forget_models(since_ms)
            self.remembered = await readings.models_seen(since_ms)
            if not self.redis_ok:
                self._reaper.redis_back()
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

    def ready(self, model: str | None = None) -> list[WorkerInfo]:
        """Live workers with a ready engine (serving ``model``)."""
        return [w for w in self.workers if w.engine_ready and (model is None or model in w.models)]

    def capacity(self, model: str | None = None) -> int:
        """Σ MAX_ACTIVE over live workers with a ready engine (serving ``model``). A worker
        whose engine serves several models counts its slots for each (they share them)."""
        return sum(w.max_active for w in self.ready(model))

    def max_model_len(self, model: str) -> int:
        """The smallest context length of the ready engines serving ``model`` (0: unknown)."""
        lengths = [w.max_model_len for w in self.ready(model) if w.max_model_len]
        return min(lengths, default=0)

    def models(self) -> list[str]:
        """What live workers serve, in the order first seen."""
        seen: dict[str, None] = {}
        for w in self.workers:
            for m in w.models:
                seen.setdefault(m, None)
        return list(seen)

    def cards(self) -> dict[str, ModelCard]:
        """Each served model as its engine describes it (the first live worker's card)."""
        out: dict[str, ModelCard] = {}
        for w in self.workers:
            by_id = {c.id: c for c in w.cards}
            for m in w.models:
                out.setdefault(m, by_id.get(m) or ModelCard(id=m))
        return out

    def card(self, model: str) -> ModelCard | None:
        """What the live workers' engines said of ``model``: the first card whose kind was
        probed (a worker that started a moment ago may not know it yet); None if none."""
        fallback = None
        for w in self.workers:
            for c in w.cards:
                if c.id == model:
                    if c.kind is not None:
                        return c
                    fallback = fallback or c
        return fallback

    def kind(self, model: str) -> ModelKind | None:
        """``model``'s kind (generate or embed) as its engines answered; None: not known
        (no live worker serves it, or none has probed it yet)."""
        found = self.card(model)
        return found.kind if found else None

    def resolve(self, name: str) -> str:
        """The served model a request's ``model`` names (MODEL_ALIASES, else itself)."""
        return self.aliases.get(name, name)

    def known(self, model: str) -> bool:
        """Served by a live worker, or within MODEL_MEMORY_S, an alias' target, or one of
        SCALE_TO_ZERO_MODELS."""
        return (
            model in self.models()
            or model in self.remembered
            or model in self.aliases.values()
            or model in self.scale_to_zero
        )

    def labelled_models(self) -> list[str]:
        """The models metrics carry a label for: bounded by the operator's fleet (served
        now or within MODEL_MEMORY_S, an alias' target, or one of SCALE_TO_ZERO_MODELS: an
        autoscaler reads the signal of a model with no worker)."""
        seen = dict.fromkeys(self.models())
        seen.update(dict.fromkeys(self.remembered))
        seen.update(dict.fromkeys(self.aliases.values()))
        seen.update(dict.fromkeys(self.scale_to_zero))
        return list(seen)

    def auto_tools(self, model: str) -> bool:
        """False when a ready engine serving ``model`` said it refuses tool_choice "auto"
        (a job may land on any of them); True otherwise, unknown included."""
        return not any(w.auto_tools is False for w in self.ready(model))
