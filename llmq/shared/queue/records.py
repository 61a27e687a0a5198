"""Reading jobs back: stored jobs' records and logs, and the queued and running jobs an
operator lists (``llmq-jobs``); a stored record's metadata update and deletion. Keys come
from ``queue.names``; the writes that change a job's state are ``queue.jobs``' scripts.
``JobRecords`` is ``Store.records``."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from arq.jobs import deserialize_job
from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.sealing import Sealer, key_id_of

# A stored record's metadata, set only while the record exists (an HSET on an expired record
# would recreate it without its other fields or a TTL).
SET_METADATA = Script(
    keys=("stored",),
    args=("metadata",),
    body="""
if redis.call('EXISTS', stored) == 0 then return 0 end
redis.call('HSET', stored, 'metadata', metadata)
return 1
""",
)


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: str
    band: p.Band
    tenant: str
    enqueued_at_ms: int
    model: str
    due_ms: int = 0  # when it is due (its deadline, Redis ms): its key's jobs go in this order

    def spec(self) -> p.JobSpec:
        """Enough of the job to cancel it (its payload may have expired)."""
        return p.JobSpec(
            id=self.id,
            model=self.model,
            stream=False,
            include_usage=False,
            enqueued_at_ms=self.enqueued_at_ms,
            tenant=self.tenant,
            band=self.band,
            body={},
        )


_RECORD_FIELDS = list(p.StoredJob.model_fields)


class JobRecords:
    def __init__(self, redis: Redis, sealer: Sealer | None = None) -> None:
        self.redis = redis
        self.sealer = sealer or Sealer()
        self._set_metadata = Registered(redis, SET_METADATA)

    async def stored(self, job_id: str) -> p.StoredJob | None:
        """A stored job's record (without its messages: ``messages`` reads those)."""
        values = await self.redis.hmget(names.stored_key(job_id), _RECORD_FIELDS)  # type: ignore[misc]
        raw = {k.encode(): v for k, v in zip(_RECORD_FIELDS, values, strict=True) if v is not None}
        return p.StoredJob.from_hash(raw) if raw.get(b"id") else None

    async def messages(self, job_id: str) -> list[dict[str, Any]] | None:
        """The messages a ``store: true`` request sent; None when none were kept. Raises
        PayloadUndecryptable."""
        kept = await self.kept(job_id)
        return None if kept is None else list(kept)

    async def kept(self, job_id: str) -> Any:
        """What a stored job kept of its request (JSON: a chat completion's messages, a
        response's input items and echoed fields); None when nothing was. Raises
        PayloadUndecryptable."""
        raw = await self.redis.hget(names.stored_key(job_id), names.STORED_MESSAGES)  # type: ignore[misc]
        if raw is None:
            return None
        return json.loads(self.sealer.open(raw, f"messages:{job_id}"))

    async def set_metadata(self, job_id: str, metadata: dict[str, str]) -> bool:
        return bool(
            await self._set_metadata(
                keys={"stored": names.stored_key(job_id)}, args={"metadata": json.dumps(metadata)}
            )
        )

    async def stored_ids(self, tenant: str, *, desc: bool) -> list[str]:
        """The tenant's stored jobs by enqueue time (some may have expired: ``forget``)."""
        key = names.tenant_stored_key(tenant)
        return [i.decode() for i in await self.redis.zrange(key, 0, -1, desc=desc)]

    async def forget_stored(self, tenant: str, job_id: str) -> None:
        """Drop an expired record's id from its tenant's index."""
        await self.redis.zrem(names.tenant_stored_key(tenant), job_id)

    async def read_log(self, job_id: str, after: int = 0) -> list[p.Event]:
        """A stored job's logged events numbered after ``after`` (out-of-band ones too),
        opened. Raises PayloadUndecryptable."""
        rows = await self.redis.xrange(names.log_key(job_id), min=f"({names.log_entry_id(after)}")
        return [self.sealer.open_event(job_id, p.Event.decode(f[b"e"])) for _, f in rows]

    async def last_logged(self, job_id: str) -> p.Event | None:
        """The last logged event, as logged (its data may be sealed: for its type)."""
        rows = await self.redis.xrevrange(names.log_key(job_id), count=1)
        return p.Event.decode(rows[0][1][b"e"]) if rows else None

    async def delete_stored(self, rec: p.StoredJob) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(names.stored_key(rec.id), names.log_key(rec.id))
            pipe.zrem(names.tenant_stored_key(rec.tenant), rec.id)
            await pipe.execute()

    async def ended(self, job_id: str) -> bool:
        """Whether the job ended (its outcome record is kept OUTCOME_TTL_S)."""
        return bool(await self.redis.exists(names.outcome_key(job_id)))

    async def outcome(self, job_id: str) -> dict[str, Any] | None:
        """How the job ended (``{"outcome", "worker"}``), while its record is kept."""
        raw = await self.redis.get(names.outcome_key(job_id))
        return None if raw is None else dict(json.loads(raw))

    async def running(self, job_id: str) -> bool:
        """Whether a worker holds the job (arq's in-progress marker)."""
        return bool(await self.redis.exists(names.in_progress_key(job_id)))

    async def log_facts(self, job_id: str) -> tuple[int, float]:
        """A stored job's logged events and the seconds left before its record expires."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(names.log_key(job_id))
            pipe.pttl(names.stored_key(job_id))
            length, ttl_ms = await pipe.execute()
        return int(length), max(0, int(ttl_ms)) / 1000

    async def job_spec(self, job_id: str) -> p.JobSpec | None:
        """A queued or running job as the gateway enqueued it (arq's payload), else None.
        Its body stays sealed: what this is for (listing, cancelling) never needs it."""
        raw = await self.redis.get(names.job_key(job_id))
        if raw is None:
            return None
        return p.JobSpec.model_validate(deserialize_job(raw, deserializer=p.json_loads).args[0])

    async def models(self) -> list[str]:
        """Every model a worker served (llmq:models), most recently seen first."""
        return [m.decode() for m in await self.redis.zrevrange(names.MODELS, 0, -1)]

    async def queued_jobs(self) -> list[QueuedJob]:
        """Every job waiting in a band queue, by model, then band (highest first), then
        due first (the order its key's jobs start in)."""
        out: list[QueuedJob] = []
        models = sorted(await self.models())
        for model in models:
            for band in p.BANDS:
                for raw in await self.redis.zrange(names.band_key(model, band), 0, -1):
                    tenant = raw.decode()
                    rows = await self.redis.zrange(
                        names.band_queue_key(model, band, tenant), 0, -1, withscores=True
                    )
                    if not rows:
                        continue
                    enqueued = await self.redis.zmscore(names.QUEUE, [i for i, _ in rows])
                    out += [
                        QueuedJob(i.decode(), p.Band(band), tenant, int(at or due), model, int(due))
                        for (i, due), at in zip(rows, enqueued, strict=True)
                    ]
        return sorted(out, key=lambda j: (models.index(j.model), p.BANDS.index(j.band), j.due_ms))

    async def migrating_jobs(self) -> list[tuple[str, str, str, int]]:
        """(job id, model, tenant, when handed over: Redis ms) of every migrated job waiting
        for a worker (``queue.migration``), by model, oldest first."""
        out = []
        for model in sorted(await self.models()):
            rows = await self.redis.zrange(names.model_resume_key(model), 0, -1, withscores=True)
            for raw, at in rows:
                _, tenant, job_id = raw.decode().split(names.BAND_QUEUE_SEP, 2)
                out.append((job_id, model, tenant, int(at)))
        return out

    async def running_jobs(self) -> list[tuple[str, str, str, str]]:
        """(job id, worker id, tenant, model) of every job a worker started and has not
        ended."""
        out = []
        for raw in await self.redis.zrange(names.WORKERS, 0, -1):
            worker = raw.decode()
            jobs: dict[bytes, bytes] = await self.redis.hgetall(names.worker_jobs_key(worker))  # type: ignore[misc]
            for job, value in jobs.items():
                tenant, model = p.worker_job_owner(value)
                out.append((job.decode(), worker, tenant, model))
        return out

    async def sealed_by(self) -> dict[str, Counter[str]]:
        """Payloads in Redis by the id of the key that sealed them (``plain``: not sealed),
        each counted by kind: ``jobs`` (queued and running requests), ``stored`` (stored
        completions: their kept messages or answer), ``files``. A key may leave
        PAYLOAD_KEYS once it seals none. SCANs the keyspace: an operator's command."""
        out: dict[str, Counter[str]] = defaultdict(Counter)
        async for key in self.redis.scan_iter(match=names.job_key("*"), count=1000):
            raw = await self.redis.get(key)
            if raw is not None:
                args = deserialize_job(raw, deserializer=p.json_loads).args
                out[key_id_of(str(args[0].get("sealed", ""))) or "plain"]["jobs"] += 1
        async for key in self.redis.scan_iter(match=names.stored_key("*"), count=1000):
            job_id = key.decode()[len(names.stored_key("")) :]
            kept = await self.redis.hget(key, names.STORED_MESSAGES)  # type: ignore[misc]
            last = await self.last_logged(job_id)
            kids = {key_id_of(v.decode()) for v in (kept, last and last.data) if v}
            for kid in {k for k in kids if k} or {"plain"}:
                out[kid]["stored"] += 1
        async for key in self.redis.scan_iter(match=names.file_lines_key("*"), count=1000):
            first = await self.redis.lindex(key, 0)  # type: ignore[misc]
            if first is not None:
                out[key_id_of(first.decode()) or "plain"]["files"] += 1
        return dict(out)
