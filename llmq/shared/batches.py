"""Every Redis operation on files and batches (the Batch API). Keys come from
``shared.keys``; records from ``shared.batch_records``, scripts from ``shared.scripts``.

Nothing about a batch lives only in a process: its input lines, progress (``next``: the
next line to feed), the requests in flight, their results and its status are in Redis, so
gateways and workers may restart at any point. Workers feed a batch a few lines at a time
(``feed``: at most ``max_inflight`` of its requests queued or running), record each
request's result once (``record``), and the first worker to see a batch done turns its
results into its output and error files (``finalize``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis

from llmq.shared import keys, scripts
from llmq.shared import protocol as p
from llmq.shared.batch_records import (
    ACTIVE,
    BatchRecord,
    BatchStatus,
    FileRecord,
    failure_line,
)
from llmq.shared.connect import confirm_replicated
from llmq.shared.errors import JobCancelled, ServiceError
from llmq.shared.lua import Registered
from llmq.shared.records import QueuedJob
from llmq.shared.sealing import Sealer
from llmq.shared.store import Store

logger = logging.getLogger(__name__)
_CHUNK = 1000  # list entries per RPUSH / LRANGE
_FINALIZE_LOCK_MS = 60_000


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class BatchStore:
    def __init__(
        self,
        redis: Redis,
        file_ttl_s: float,
        replicas_ack: int = 0,
        wait_timeout_s: float = 1.0,
        sealer: Sealer | None = None,
    ) -> None:
        """``replicas_ack``: REDIS_MIN_REPLICAS_ACK, the replicas an uploaded file and a
        created batch must reach before they are confirmed (the gateway's; 0 elsewhere).
        ``sealer``: PAYLOAD_KEYS: file lines, batch jobs and results are sealed with it."""
        self._replicas = (replicas_ack, wait_timeout_s)
        self.redis = redis
        self.sealer = sealer or Sealer()
        self.file_ttl_ms = int(file_ttl_s * 1000)
        self._feed = Registered(redis, scripts.FEED)
        self._result = Registered(redis, scripts.RESULT)
        self._end = Registered(redis, scripts.END)

    # -- files -------------------------------------------------------------------------
    async def create_file(
        self,
        tenant: str,
        purpose: str,
        filename: str,
        lines: Sequence[bytes],
        models: Sequence[str] = (),
    ) -> FileRecord:
        """A file of JSONL ``lines``; ``models``: those a batch input's lines name."""
        now = int(time.time())
        rec = FileRecord(
            id=new_id("file"),
            tenant=tenant,
            purpose=purpose,
            filename=filename,
            bytes=sum(len(line) + 1 for line in lines),
            lines=len(lines),
            created_at=now,
            expires_at=now + self.file_ttl_ms // 1000,
            models=json.dumps(list(models)),
        )
        key = keys.file_lines_key(rec.id)
        where = f"file:{rec.id}"
        lines = [self.sealer.seal(line, where) for line in lines]
        async with self.redis.pipeline(transaction=True) as pipe:
            for i in range(0, len(lines), _CHUNK):
                pipe.rpush(key, *lines[i : i + _CHUNK])
            pipe.hset(keys.file_key(rec.id), mapping=rec.to_hash())
            pipe.pexpire(key, self.file_ttl_ms)
            pipe.pexpire(keys.file_key(rec.id), self.file_ttl_ms)
            index = keys.tenant_files_key(tenant)  # score: µs, so quick uploads keep their order
            created_us = time.time_ns() // 1000
            pipe.zadd(index, {rec.id: created_us})
            pipe.zremrangebyscore(index, "-inf", created_us - self.file_ttl_ms * 1000)
            await pipe.execute()
        await confirm_replicated(self.redis, *self._replicas)
        return rec

    async def file(self, file_id: str) -> FileRecord | None:
        raw = await self.redis.hgetall(keys.file_key(file_id))  # type: ignore[misc]
        return FileRecord.model_validate(_decoded(raw)) if raw else None

    async def file_lines(self, file_id: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Lines ``start`` to ``stop`` (inclusive), opened (raises PayloadUndecryptable)."""
        out: list[bytes] = await self.redis.lrange(keys.file_lines_key(file_id), start, stop)  # type: ignore[misc]
        return [self.sealer.open(line, f"file:{file_id}") for line in out]

    async def delete_file(self, rec: FileRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file_key(rec.id), keys.file_lines_key(rec.id))
            pipe.zrem(keys.tenant_files_key(rec.tenant), rec.id)
            await pipe.execute()

    async def list_files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int, desc: bool
    ) -> list[FileRecord]:
        """The key's files (``purpose`` only, when given), by creation time, after the one
        named ``after``; at most ``limit``. Expired files are dropped from the index."""
        key = keys.tenant_files_key(tenant)
        ids = [i.decode() for i in await self.redis.zrange(key, 0, -1, desc=desc)]
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        out: list[FileRecord] = []
        for file_id in ids:
            rec = await self.file(file_id)
            if rec is None:
                await self.redis.zrem(key, file_id)
            elif purpose is None or rec.purpose == purpose:
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    # -- batches -----------------------------------------------------------------------
    async def create_batch(self, rec: BatchRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch_key(rec.id), mapping=rec.to_hash())
            pipe.zadd(keys.tenant_batches_key(rec.tenant), {rec.id: rec.created_at * 1000})
            pipe.sadd(keys.ACTIVE_BATCHES, rec.id)
            pipe.publish(keys.WAKE_CHANNEL, "batch")  # idle workers feed it at once
            await pipe.execute()
        try:
            await confirm_replicated(self.redis, *self._replicas)
        except ServiceError:  # refused: it must not run (a retry creates another)
            await self.end(rec.id, BatchStatus.CANCELLED.value)
            raise

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self.redis.hgetall(keys.batch_key(batch_id))  # type: ignore[misc]
        return BatchRecord.model_validate(_decoded(raw)) if raw else None

    async def list_batches(self, tenant: str, after: str | None, limit: int) -> list[BatchRecord]:
        """The key's batches, newest first, after the one named ``after``."""
        key = keys.tenant_batches_key(tenant)
        start = 0
        if after:
            rank = await self.redis.zrevrank(key, after)
            start = 0 if rank is None else rank + 1
        ids = await self.redis.zrevrange(key, start, start + limit - 1)
        out = []
        for raw_id in ids:
            rec = await self.batch(raw_id.decode())
            if rec is None:  # expired: drop it from the index
                await self.redis.zrem(key, raw_id)
            else:
                out.append(rec)
        return out

    async def active(self) -> list[str]:
        return sorted(m.decode() for m in await self.redis.smembers(keys.ACTIVE_BATCHES))  # type: ignore[misc]

    async def overview(self) -> tuple[dict[str, int], set[str]]:
        """One pass over the batches in flight (the gateways' gauges, every refresh): how
        many are in each active status (in_progress, cancelling, finalizing), and the served
        models that in-progress batches still have lines to feed for: their workers feed
        them, so a model scaled to zero must get one (the scaling signal)."""
        counts = dict.fromkeys((s.value for s in ACTIVE), 0)
        demand: set[str] = set()
        for batch_id in await self.active():
            rec = await self.batch(batch_id)
            if rec is None:
                continue
            if rec.status.value in counts:
                counts[rec.status.value] += 1
            if rec.status is not BatchStatus.IN_PROGRESS or rec.next >= rec.total:
                continue
            source = await self.file(rec.input_file_id)
            routes = json.loads(rec.routes)
            for model in json.loads(source.models or "[]") if source else []:
                demand.add(routes.get(model, model))
        return counts, demand

    async def demand(self) -> set[str]:
        """The models in-progress batches still have lines to feed for (``overview``)."""
        return (await self.overview())[1]

    async def end(self, batch_id: str, why: str) -> str:
        """Stop feeding a batch (``cancelled`` or ``expired``); returns its status."""
        out = await self._end(
            keys={"batch": keys.batch_key(batch_id)}, args={"why": why, "now_s": int(time.time())}
        )
        return out.decode() if isinstance(out, bytes) else str(out)

    async def inflight(self, batch_id: str) -> list[str]:
        ids = await self.redis.smembers(keys.batch_part_key(batch_id, keys.BATCH_INFLIGHT))  # type: ignore[misc]
        return sorted(i.decode() for i in ids)

    async def count_inflight(self, batch_id: str) -> int:
        return int(await self.redis.scard(keys.batch_part_key(batch_id, keys.BATCH_INFLIGHT)))  # type: ignore[misc]

    async def feed(self, rec: BatchRecord, specs: list[p.JobSpec], new_next: int) -> int:
        """Enqueue the next lines' jobs (each into its model's queue), unless another worker
        fed them first."""
        triples: list[Any] = []
        for spec in specs:
            payload = serialize_job(
                p.JOB_FUNCTION,
                (self.sealer.seal_spec(spec).model_dump(mode="json"),),
                {},
                1,
                spec.enqueued_at_ms,
                serializer=p.json_dumps,
            )
            triples += [spec.id, payload, spec.model]
        now_ms = int(time.time() * 1000)
        out = await self._feed(
            keys={
                "batch": keys.batch_key(rec.id),
                "inflight": keys.batch_part_key(rec.id, keys.BATCH_INFLIGHT),
                "queue": keys.QUEUE,
            },
            args={
                "expected_next": rec.next,
                "new_next": new_next,
                "job_ttl_ms": max(1000, rec.expires_at * 1000 - now_ms),
                "score_ms": now_ms,
                "wake": keys.WAKE_CHANNEL,
                "tenant": rec.tenant,
                "job_prefix": keys.job_key(""),
                "model_prefix": keys.MODEL_PREFIX,
            },
            rest=triples,
        )
        return int(out)

    async def record(self, spec: p.JobSpec, line: str, ok: bool) -> bool:
        """A request's result line, counted once (False: it was counted already)."""
        out = await self._result(
            keys={
                "batch": keys.batch_key(spec.batch_id),
                "out": keys.batch_part_key(spec.batch_id, keys.BATCH_OUT),
                "err": keys.batch_part_key(spec.batch_id, keys.BATCH_ERR),
                "inflight": keys.batch_part_key(spec.batch_id, keys.BATCH_INFLIGHT),
            },
            args={
                "job_id": spec.id,
                "index": spec.batch_index,
                "line": self.sealer.seal_text(line, f"result:{spec.batch_id}"),
                "ok": "1" if ok else "0",
            },
        )
        return bool(out)

    async def take_back(self, store: Store, rec: BatchRecord) -> list[str]:
        """Cancel the requests of an ending batch that have not started (they leave no
        result); returns those still running."""
        running = []
        why = JobCancelled(f"batch {rec.id} is {rec.ending or 'ending'}")
        for job_id in await self.inflight(rec.id):
            spec = await store.records.job_spec(job_id)  # None: its payload expired
            model = spec.model if spec else ""
            job = QueuedJob(job_id, p.Band.LOW, rec.tenant, 0, model)
            if await store.cancel(job.spec(), why, queued_only=True):
                await self.redis.srem(keys.batch_part_key(rec.id, keys.BATCH_INFLIGHT), job_id)  # type: ignore[misc]
            else:
                running.append(job_id)
        return running

    async def finalize(self, rec: BatchRecord) -> BatchRecord | None:
        """Turn a batch's results into its output and error files and give it its final
        status (one worker does it: a lock; redone if that worker died midway)."""
        lock = keys.batch_part_key(rec.id, "finalizing")
        if not await self.redis.set(lock, "1", nx=True, px=_FINALIZE_LOCK_MS):
            return None
        fresh = await self.batch(rec.id)  # another worker may have finalized it already
        if fresh is None or fresh.status not in ACTIVE:
            await self.redis.delete(lock)
            return None
        rec = fresh
        now = int(time.time())
        await self.redis.hset(
            keys.batch_key(rec.id), mapping={"status": "finalizing", "finalizing_at": str(now)}
        )  # type: ignore[misc]
        out = await self._results(rec.id, keys.BATCH_OUT)
        err = await self._results(rec.id, keys.BATCH_ERR)
        if rec.ending == "expired" and rec.next < rec.total:  # never fed: batch_expired
            rest = await self.file_lines(rec.input_file_id, rec.next, rec.total - 1)
            err += [_expired_line(rec, rec.next + i, raw) for i, raw in enumerate(rest)]
        fields: dict[str, str] = {}
        if out:
            fields["output_file_id"] = (await self._result_file(rec, "output", out)).id
        if err:
            fields["error_file_id"] = (await self._result_file(rec, "errors", err)).id
        final = {
            "expired": BatchStatus.EXPIRED,
            "cancelled": BatchStatus.CANCELLED,
        }.get(rec.ending, BatchStatus.COMPLETED)
        fields["status"] = final.value
        fields[f"{final.value}_at"] = str(int(time.time()))
        if final is BatchStatus.EXPIRED:
            fields["failed"] = str(rec.failed + (rec.total - rec.next))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch_key(rec.id), mapping=fields)
            pipe.pexpire(keys.batch_key(rec.id), self.file_ttl_ms)
            pipe.srem(keys.ACTIVE_BATCHES, rec.id)
            pipe.delete(
                keys.batch_part_key(rec.id, keys.BATCH_OUT),
                keys.batch_part_key(rec.id, keys.BATCH_ERR),
                keys.batch_part_key(rec.id, keys.BATCH_INFLIGHT),
                lock,
            )
            await pipe.execute()
        return await self.batch(rec.id)

    async def fail(self, rec: BatchRecord, message: str) -> None:
        """A batch that cannot run (its input file is gone)."""
        now = str(int(time.time()))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.batch_key(rec.id),
                mapping={"status": "failed", "failed_at": now, "failure": message},
            )
            pipe.pexpire(keys.batch_key(rec.id), self.file_ttl_ms)
            pipe.srem(keys.ACTIVE_BATCHES, rec.id)
            await pipe.execute()

    async def _results(self, batch_id: str, part: str) -> list[bytes]:
        """A batch's result lines (``part``: out or err) in input order, opened."""
        raw: dict[bytes, bytes] = await self.redis.hgetall(keys.batch_part_key(batch_id, part))  # type: ignore[misc]
        return [self.sealer.open(raw[k], f"result:{batch_id}") for k in sorted(raw, key=int)]

    async def _result_file(self, rec: BatchRecord, kind: str, lines: list[bytes]) -> FileRecord:
        return await self.create_file(rec.tenant, "batch_output", f"{rec.id}_{kind}.jsonl", lines)


def _expired_line(rec: BatchRecord, index: int, raw: bytes) -> bytes:
    custom_id = str(json.loads(raw).get("custom_id", ""))
    job_id = keys.batch_job_id(rec.id, index)
    return failure_line(job_id, custom_id, "batch_expired", "the batch expired").encode()
