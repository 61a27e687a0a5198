"""Reading jobs back: stored jobs' records and logs, and the queued and running jobs an
operator lists (``llmq-jobs``). Keys come from ``shared.protocol``; the writes that change a
job's state are ``shared.store``'s scripts."""

from __future__ import annotations

from dataclasses import dataclass

from arq.jobs import deserialize_job
from redis.asyncio import Redis

from llmq.shared import protocol as p


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: str
    band: p.Band
    tenant: str
    enqueued_at_ms: int

    def spec(self) -> p.JobSpec:
        """Enough of the job to cancel it (its payload may have expired)."""
        return p.JobSpec(
            id=self.id,
            model="",
            stream=False,
            include_usage=False,
            enqueued_at_ms=self.enqueued_at_ms,
            tenant=self.tenant,
            band=self.band,
            body={},
        )


class JobRecords:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def stored(self, job_id: str) -> p.StoredJob | None:
        raw: dict[bytes, bytes] = await self.redis.hgetall(p.stored_key(job_id))  # type: ignore[misc]
        return p.StoredJob.from_hash(raw) if raw else None

    async def read_log(self, job_id: str, after: int = 0) -> list[p.Event]:
        """A stored job's logged events numbered after ``after`` (out-of-band ones too)."""
        rows = await self.redis.xrange(p.log_key(job_id), min=f"({p.log_entry_id(after)}")
        return [p.Event.decode(fields[b"e"]) for _, fields in rows]

    async def last_logged(self, job_id: str) -> p.Event | None:
        rows = await self.redis.xrevrange(p.log_key(job_id), count=1)
        return p.Event.decode(rows[0][1][b"e"]) if rows else None

    async def delete_stored(self, job_id: str) -> None:
        await self.redis.delete(p.stored_key(job_id), p.log_key(job_id))

    async def job_spec(self, job_id: str) -> p.JobSpec | None:
        """A queued or running job as the gateway enqueued it (arq's payload), else None."""
        raw = await self.redis.get(p.job_key(job_id))
        if raw is None:
            return None
        return p.JobSpec.model_validate(deserialize_job(raw, deserializer=p.json_loads).args[0])

    async def queued_jobs(self) -> list[QueuedJob]:
        """Every job waiting in a band queue, by band (highest first), oldest first."""
        out: list[QueuedJob] = []
        for band in p.BANDS:
            for raw in await self.redis.zrange(p.band_key(band), 0, -1):
                tenant = raw.decode()
                rows = await self.redis.zrange(
                    p.band_queue_key(band, tenant), 0, -1, withscores=True
                )
                out += [QueuedJob(i.decode(), p.Band(band), tenant, int(ms)) for i, ms in rows]
        return sorted(out, key=lambda j: (p.BANDS.index(j.band), j.enqueued_at_ms))

    async def running_jobs(self) -> list[tuple[str, str, str]]:
        """(job id, worker id, tenant) of every job a worker started and has not ended."""
        out = []
        for raw in await self.redis.zrange(p.WORKERS, 0, -1):
            worker = raw.decode()
            jobs: dict[bytes, bytes] = await self.redis.hgetall(p.worker_jobs_key(worker))  # type: ignore[misc]
            out += [(j.decode(), worker, t.decode()) for j, t in jobs.items()]
        return out
