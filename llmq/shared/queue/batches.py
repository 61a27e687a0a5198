"""Every Redis operation on files and batches (the Batch API), with the scripts it runs.
Keys come from ``queue.names``; records from ``queue.batch_records``.

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

from llmq.shared import protocol as p
from llmq.shared.errors import JobCancelled, ServiceError
from llmq.shared.protocol import Band
from llmq.shared.queue import names
from llmq.shared.queue.batch_records import (
    ACTIVE,
    BatchRecord,
    BatchStatus,
    FileRecord,
    failure_line,
)
from llmq.shared.queue.failover import confirm_replicated
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.queue.records import QueuedJob
from llmq.shared.queue.store import Store
from llmq.shared.sealing import Sealer

_BATCH = {"IN_PROGRESS": BatchStatus.IN_PROGRESS.value}


# Feed the next lines of a batch that is in progress and not ending, if nobody fed them
# first (its ``next`` still ``expected_next``): any worker may run the feeder, a line is
# enqueued once, into the lowest band of its own model's queue, due when the batch expires
# (after its key's requests in that band, which are due sooner). ``jobs``: job id / payload /
# model triples. The models' workers are woken.
FEED = Script(
    keys=("batch", "inflight", "queue"),
    args=("expected_next", "new_next", "job_ttl_ms", "score_ms", "wake", "tenant", "job_prefix",
          "model_prefix"),
    rest="jobs",
    consts={**_BATCH, "BAND_PART": names.BAND_PART, "SEP": names.BAND_QUEUE_SEP,
            "LOW": Band.LOW.value, "WAKE_MODEL": names.WAKE_MODEL},
    body="""
local b = redis.call('HMGET', batch, 'status', 'next', 'ending')
if b[1] ~= IN_PROGRESS or b[2] ~= expected_next or (b[3] and b[3] ~= '') then return 0 end
local n, woken = 0, {}
for i = 1, #jobs, 3 do
  local id, model = jobs[i], jobs[i + 2]
  local index = model_prefix .. model .. BAND_PART .. LOW
  redis.call('SET', job_prefix .. id, jobs[i + 1], 'PX', job_ttl_ms)
  redis.call('ZADD', queue, score_ms, id)
  redis.call('ZADD', index .. SEP .. tenant, score_ms + job_ttl_ms, id)
  redis.call('ZADD', index, 'NX', 0, tenant)
  redis.call('SADD', inflight, id)
  woken[model] = true
  n = n + 1
end
redis.call('HSET', batch, 'next', new_next)
for model in pairs(woken) do redis.call('PUBLISH', wake, WAKE_MODEL .. model) end
return n
""",
)  # fmt: skip


# A batch request's result line (``ok`` "1": the output file's, "0": the error file's),
# recorded and counted once: only while the job is in the batch's inflight set.
RESULT = Script(
    keys=("batch", "out", "err", "inflight"),
    args=("job_id", "index", "line", "ok"),
    body="""
if redis.call('SREM', inflight, job_id) == 0 then return 0 end
if ok == '1' then
  redis.call('HSET', out, index, line)
  redis.call('HINCRBY', batch, 'completed', 1)
else
  redis.call('HSET', err, index, line)
  redis.call('HINCRBY', batch, 'failed', 1)
end
return 1
""",
)


# A batch still running stops being fed (``why``: cancelled or expired); a cancel also
# shows ``cancelling`` (since ``now_s``). Returns the status it leaves.
END = Script(
    keys=("batch",),
    args=("why", "now_s"),
    consts={
        **_BATCH,
        "VALIDATING": BatchStatus.VALIDATING.value,
        "CANCELLED": BatchStatus.CANCELLED.value,
        "CANCELLING": BatchStatus.CANCELLING.value,
    },
    body="""
local status = redis.call('HGET', batch, 'status')
if status ~= IN_PROGRESS and status ~= VALIDATING then return status end
local ending = redis.call('HGET', batch, 'ending')
if ending and ending ~= '' then return status end
redis.call('HSET', batch, 'ending', why)
if why == CANCELLED then
  redis.call('HSET', batch, 'status', CANCELLING, 'cancelling_at', now_s)
  return CANCELLING
end
return status
""",
)

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
        self._feed = Registered(redis, FEED)
        self._result = Registered(redis, RESULT)
        self._end = Registered(redis, END)

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
        key = names.file_lines_key(rec.id)
        where = f"file:{rec.id}"
        lines = [self.sealer.seal(line, where) for line in lines]
        async with self.redis.pipeline(transaction=True) as pipe:
            for i in range(0, len(lines), _CHUNK):
                pipe.rpush(key, *lines[i : i + _CHUNK])
            pipe.hset(names.file_key(rec.id), mapping=rec.to_hash())
            pipe.pexpire(key, self.file_ttl_ms)
            pipe.pexpire(names.file_key(rec.id), self.file_ttl_ms)
            index = names.tenant_files_key(tenant)  # score: µs, so quick uploads keep their order
            created_us = time.time_ns() // 1000
            pipe.zadd(index, {rec.id: created_us})
            pipe.zremrangebyscore(index, "-inf", created_us - self.file_ttl_ms * 1000)
            await pipe.execute()
        await confirm_replicated(self.redis, *self._replicas)
        return rec

    async def file(self, file_id: str) -> FileRecord | None:
        raw = await self.redis.hgetall(names.file_key(file_id))  # type: ignore[misc]
        return FileRecord.model_validate(_decoded(raw)) if raw else None

    async def file_lines(self, file_id: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Lines ``start`` to ``stop`` (inclusive), opened (raises PayloadUndecryptable)."""
        out: list[bytes] = await self.redis.lrange(names.file_lines_key(file_id), start, stop)  # type: ignore[misc]
        return [self.sealer.open(line, f"file:{file_id}") for line in out]

    async def delete_file(self, rec: FileRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(names.file_key(rec.id), names.file_lines_key(rec.id))
            pipe.zrem(names.tenant_files_key(rec.tenant), rec.id)
            await pipe.execute()

    async def list_files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int, desc: bool
    ) -> list[FileRecord]:
        """The key's files (``purpose`` only, when given), by creation time, after the one
        named ``after``; at most ``limit``. Expired files are dropped from the index."""
        key = names.tenant_files_key(tenant)
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
            pipe.hset(names.batch_key(rec.id), mapping=rec.to_hash())
            pipe.zadd(names.tenant_batches_key(rec.tenant), {rec.id: rec.created_at * 1000})
            pipe.sadd(names.ACTIVE_BATCHES, rec.id)
            pipe.publish(names.WAKE_CHANNEL, "batch")  # idle workers feed it at once
            await pipe.execute()
        try:
            await confirm_replicated(self.redis, *self._replicas)
        except ServiceError:  # refused: it must not run (a retry creates another)
            await self.end(rec.id, BatchStatus.CANCELLED.value)
            raise

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self.redis.hgetall(names.batch_key(batch_id))  # type: ignore[misc]
        return BatchRecord.model_validate(_decoded(raw)) if raw else None

    async def list_batches(self, tenant: str, after: str | None, limit: int) -> list[BatchRecord]:
        """The key's batches, newest first, after the one named ``after``."""
        key = names.tenant_batches_key(tenant)
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
        return sorted(m.decode() for m in await self.redis.smembers(names.ACTIVE_BATCHES))  # type: ignore[misc]

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

    async def end(self, batch_id: str, why: str) -> str:
        """Stop feeding a batch (``cancelled`` or ``expired``); returns its status."""
        out = await self._end(
            keys={"batch": names.batch_key(batch_id)}, args={"why": why, "now_s": int(time.time())}
        )
        return out.decode() if isinstance(out, bytes) else str(out)

    async def inflight(self, batch_id: str) -> list[str]:
        ids = await self.redis.smembers(names.batch_part_key(batch_id, names.BATCH_INFLIGHT))  # type: ignore[misc]
        return sorted(i.decode() for i in ids)

    async def count_inflight(self, batch_id: str) -> int:
        return int(await self.redis.scard(names.batch_part_key(batch_id, names.BATCH_INFLIGHT)))  # type: ignore[misc]

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
                "batch": names.batch_key(rec.id),
                "inflight": names.batch_part_key(rec.id, names.BATCH_INFLIGHT),
                "queue": names.QUEUE,
            },
            args={
                "expected_next": rec.next,
                "new_next": new_next,
                "job_ttl_ms": max(1000, rec.expires_at * 1000 - now_ms),
                "score_ms": now_ms,
                "wake": names.WAKE_CHANNEL,
                "tenant": rec.tenant,
                "job_prefix": names.job_key(""),
                "model_prefix": names.MODEL_PREFIX,
            },
            rest=triples,
        )
        return int(out)

    async def record(self, spec: p.JobSpec, line: str, ok: bool) -> bool:
        """A request's result line, counted once (False: it was counted already)."""
        out = await self._result(
            keys={
                "batch": names.batch_key(spec.batch_id),
                "out": names.batch_part_key(spec.batch_id, names.BATCH_OUT),
                "err": names.batch_part_key(spec.batch_id, names.BATCH_ERR),
                "inflight": names.batch_part_key(spec.batch_id, names.BATCH_INFLIGHT),
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
            if await store.jobs.cancel(job.spec(), why, queued_only=True):
                await self.redis.srem(names.batch_part_key(rec.id, names.BATCH_INFLIGHT), job_id)  # type: ignore[misc]
            else:
                running.append(job_id)
        return running

    async def finalize(self, rec: BatchRecord) -> BatchRecord | None:
        """Turn a batch's results into its output and error files and give it its final
        status (one worker does it: a lock; redone if that worker died midway)."""
        lock = names.batch_part_key(rec.id, "finalizing")
        if not await self.redis.set(lock, "1", nx=True, px=_FINALIZE_LOCK_MS):
            return None
        fresh = await self.batch(rec.id)  # another worker may have finalized it already
        if fresh is None or fresh.status not in ACTIVE:
            await self.redis.delete(lock)
            return None
        rec = fresh
        now = int(time.time())
        await self.redis.hset(
            names.batch_key(rec.id), mapping={"status": "finalizing", "finalizing_at": str(now)}
        )  # type: ignore[misc]
        out = await self._results(rec.id, names.BATCH_OUT)
        err = await self._results(rec.id, names.BATCH_ERR)
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
            pipe.hset(names.batch_key(rec.id), mapping=fields)
            pipe.pexpire(names.batch_key(rec.id), self.file_ttl_ms)
            pipe.srem(names.ACTIVE_BATCHES, rec.id)
            pipe.delete(
                names.batch_part_key(rec.id, names.BATCH_OUT),
                names.batch_part_key(rec.id, names.BATCH_ERR),
                names.batch_part_key(rec.id, names.BATCH_INFLIGHT),
                lock,
            )
            await pipe.execute()
        return await self.batch(rec.id)

    async def fail(self, rec: BatchRecord, message: str) -> None:
        """A batch that cannot run (its input file is gone)."""
        now = str(int(time.time()))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                names.batch_key(rec.id),
                mapping={"status": "failed", "failed_at": now, "failure": message},
            )
            pipe.pexpire(names.batch_key(rec.id), self.file_ttl_ms)
            pipe.srem(names.ACTIVE_BATCHES, rec.id)
            await pipe.execute()

    async def _results(self, batch_id: str, part: str) -> list[bytes]:
        """A batch's result lines (``part``: out or err) in input order, opened."""
        raw: dict[bytes, bytes] = await self.redis.hgetall(names.batch_part_key(batch_id, part))  # type: ignore[misc]
        return [self.sealer.open(raw[k], f"result:{batch_id}") for k in sorted(raw, key=int)]

    async def _result_file(self, rec: BatchRecord, kind: str, lines: list[bytes]) -> FileRecord:
        return await self.create_file(rec.tenant, "batch_output", f"{rec.id}_{kind}.jsonl", lines)


def _expired_line(rec: BatchRecord, index: int, raw: bytes) -> bytes:
    custom_id = str(json.loads(raw).get("custom_id", ""))
    job_id = names.batch_job_id(rec.id, index)
    return failure_line(job_id, custom_id, "batch_expired", "the batch expired").encode()
