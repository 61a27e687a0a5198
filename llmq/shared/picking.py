"""The pick, from Python: a part of ``Store`` (its mixin), kept apart so each module stays
readable. The script and its rules are ``scripts.pick``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from llmq.shared import keys
from llmq.shared.lua import Registered

WINDOW = 8  # a key's oldest waiting jobs that cache-aware pickup chooses among
INDEX_MAX = 65_536  # prefix hashes in the owners index (llmq:prefix-owners), all workers


@dataclass(frozen=True, slots=True)
class Affinity:
    """Cache-aware pickup's terms (PREFIX_AFFINITY and the AFFINITY_* settings)."""

    max_wait_ms: int = 50
    record_max: int = 4096
    ttl_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Picked:
    """A job the pick claimed for this worker."""

    id: str
    score: int  # its queue score (the gateway's enqueue ms)
    held: int = 0  # prefix blocks this worker's engine probably holds
    best: int = 0  # the most any live worker's engine holds
    left_ms: int = -1  # how long it was left for a warmer worker (-1: never)

    @property
    def affinity(self) -> str:
        """``hit`` (taken where its prefix is held deepest), ``miss`` (a live worker held
        more of it) or ``cold`` (no worker held any)."""
        if self.best == 0:
            return "cold"
        return "hit" if self.held >= self.best else "miss"


@dataclass(frozen=True, slots=True)
class PickResult:
    jobs: list[Picked] = field(default_factory=list)
    retry_ms: int = -1  # look again then: a job left for a warmer worker may be taken (-1: none)


class Picking:
    """Store's pick (``Store`` sets the attributes it uses)."""

    redis: Redis
    _pick: Registered

    async def pick(
        self,
        models: tuple[str, ...],
        limit: int,
        in_progress_s: float,
        worker_id: str = "",
        affinity: Affinity | None = None,
    ) -> PickResult:
        """Up to ``limit`` waiting jobs for ``models`` to start now, each claimed (arq's
        in-progress key, for ``in_progress_s``) for ``worker_id`` until it starts: highest
        band first; within a band the model served least recently, then its key served
        least recently (fair queuing); with ``affinity``, the jobs whose prompt prefix this
        worker's engine holds (``scripts.pick``)."""
        if not models:
            return PickResult()
        a = affinity or Affinity()
        flat: list[Any] = await self._pick(
            keys={
                "queue": keys.QUEUE,
                "served": keys.BAND_SERVED,
                "models_served": keys.MODELS_SERVED,
                "claims": keys.worker_claims_key(worker_id),
                "workers": keys.WORKERS,
                "records": keys.worker_prefixes_key(worker_id),
                "owners": keys.PREFIX_OWNERS,
                "seen": keys.PREFIX_SEEN,
            },
            args={
                "in_progress_prefix": keys.IN_PROGRESS_PREFIX,
                "job_prefix": keys.job_key(""),
                "model_prefix": keys.MODEL_PREFIX,
                "limit": limit,
                "claim_ms": max(1, int(in_progress_s * 1000)),
                "worker_id": worker_id,
                "affinity": "1" if affinity else "0",
                "max_wait_ms": a.max_wait_ms,
                "window": WINDOW,
                "record_max": a.record_max,
                "record_ttl_ms": int(a.ttl_s * 1000),
                "index_max": INDEX_MAX,
                "prefix_prefix": keys.PREFIX_PREFIX,
                "worker_prefix": keys.WORKER_PREFIX,
                "worker_jobs_prefix": keys.WORKER_JOBS_PREFIX,
                "worker_claims_prefix": keys.WORKER_CLAIMS_PREFIX,
                "records_prefix": keys.WORKER_PREFIXES_PREFIX,
            },
            rest=models,
        )
        jobs = [
            Picked(flat[i].decode(), *(int(v) for v in flat[i + 1 : i + 5]))
            for i in range(1, len(flat), 5)
        ]
        return PickResult(jobs, int(flat[0]))

    async def pick_jobs(
        self, models: tuple[str, ...], limit: int, in_progress_s: float, worker_id: str = ""
    ) -> list[tuple[str, int]]:
        """``pick`` without affinity: (id, queue score) of each job claimed."""
        result = await self.pick(models, limit, in_progress_s, worker_id)
        return [(j.id, j.score) for j in result.jobs]
