"""Worker liveness in Redis: heartbeats, leaving, and the reaper of dead workers' jobs. A
part of ``Store`` (its mixin), kept apart so each module stays readable."""

from __future__ import annotations

import json
import logging
from typing import Any

from redis.asyncio import Redis

from llmq.shared import keys
from llmq.shared import protocol as p
from llmq.shared.batch_records import failure_line
from llmq.shared.errors import ServiceError, WorkerLost
from llmq.shared.lua import Registered

_OUTCOME_TTL_MS = p.OUTCOME_TTL_S * 1000


def log_reaped(logger: logging.Logger, dead: list[str], jobs: int) -> None:
    if dead:
        logger.warning(
            "worker(s) %s lost their heartbeat: %d started job(s) ended with worker_lost",
            ", ".join(dead),
            jobs,
        )


# A dead worker's batch request: its error line, with the placeholders the reap script fills.
_REAPED_BATCH_LINE = failure_line(
    "@@ID@@", "@@CUSTOM_ID@@", "worker_lost", "the worker running it stopped"
)


def out_of_band(err: ServiceError) -> bytes:
    """An out-of-band error event (seq 0), as the reaper and a cancel publish it."""
    data = json.dumps(err.to_wire(), separators=(",", ":")).encode()
    return p.Event(p.OUT_OF_BAND, p.EventType.ERROR, data).encode()


class Liveness:
    """Store's worker-liveness operations (``Store`` sets the attributes they use)."""

    redis: Redis
    store_ttl_ms: int
    _reap: Registered
    _heartbeat: Registered
    _requeue: Registered

    async def requeue_claims(self, worker_id: str, running: list[str], min_age_s: float) -> int:
        """Return to the queue the jobs this worker picked at least ``min_age_s`` ago and
        is not running (``running``: every job id it holds or has started): a pick whose
        reply never arrived. See ``scripts.REQUEUE``."""
        return int(
            await self._requeue(
                keys={"claims": keys.worker_claims_key(worker_id), "queue": keys.QUEUE},
                args={
                    "job_prefix": keys.job_key(""),
                    "in_progress_prefix": keys.IN_PROGRESS_PREFIX,
                    "model_prefix": keys.MODEL_PREFIX,
                    "wake": keys.WAKE_CHANNEL,
                    "min_age_ms": int(min_age_s * 1000),
                },
                rest=running,
            )
        )

    async def heartbeat(self, info: p.WorkerInfo, ttl_s: float) -> None:
        await self._heartbeat(
            keys={
                "worker": keys.worker_key(info.worker_id),
                "workers": keys.WORKERS,
                "models": keys.MODELS,
            },
            args={
                "worker_id": info.worker_id,
                "ttl_ms": int(ttl_s * 1000),
                "models_json": json.dumps(list(info.models)),
            },
            rest=[x for kv in info.to_hash().items() for x in kv],
        )

    async def forget_models(self, before_ms: int) -> None:
        """Models no worker served since ``before_ms`` (Unix ms) leave ``llmq:models``."""
        await self.redis.zremrangebyscore(keys.MODELS, "-inf", f"({before_ms}")

    async def remove_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.worker_key(worker_id), keys.worker_prefixes_key(worker_id))
            pipe.zrem(keys.WORKERS, worker_id)
            await pipe.execute()

    async def reap(self) -> tuple[list[str], int]:
        """Reclaim what dead workers held (see ``scripts.REAP``); returns (dead worker ids, jobs).

        Each reclaimed job's client gets ``worker_lost`` as an out-of-band error event."""
        lost = WorkerLost("the worker running this job stopped (its heartbeat expired)")
        out: list[Any] = await self._reap(
            keys={"workers": keys.WORKERS, "queue": keys.QUEUE},
            args={
                "model_prefix": keys.MODEL_PREFIX,
                "worker_prefix": keys.WORKER_PREFIX,
                "worker_jobs_prefix": keys.WORKER_JOBS_PREFIX,
                "worker_claims_prefix": keys.WORKER_CLAIMS_PREFIX,
                "job_prefix": keys.job_key(""),
                "in_progress_prefix": keys.IN_PROGRESS_PREFIX,
                "events_prefix": keys.EVENTS_PREFIX,
                "error_event": out_of_band(lost),
                "tenant_prefix": keys.TENANT_PREFIX,
                "outcome_prefix": keys.OUTCOME_PREFIX,
                "outcome_record": p.outcome_record(p.Outcome.WORKER_LOST),
                "outcome_ttl_ms": _OUTCOME_TTL_MS,
                "stored_prefix": keys.STORED_PREFIX,
                "log_prefix": keys.LOG_PREFIX,
                "store_ttl_ms": self.store_ttl_ms,
                "batch_job_prefix": keys.BATCH_JOB_PREFIX,
                "batch_prefix": keys.BATCH_PREFIX,
                "failure_line": _REAPED_BATCH_LINE,
                "worker_prefixes_prefix": keys.WORKER_PREFIXES_PREFIX,
            },
        )
        return [w.decode() for w in out[:-1]], int(out[-1])
