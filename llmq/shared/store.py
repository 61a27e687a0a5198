"""Every Redis operation of the service, atomic where it must be (Lua).

Times that decide admission, liveness and deadlines come from Redis' own clock (``TIME``), so
gateways and workers on different hosts agree on them. Keys come from ``shared.protocol``.
Scripts that visit keys named inside other keys (workers, in-progress markers) need a single
Redis, not a cluster: the deployment has one Redis with AOF.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.errors import WorkerLost

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS: admitted, queue, job key. ARGV: limit, hold_ms, payload, expire_ms, job_id, score_ms,
# wake channel. Returns {1, n} admitted, {0, n} full, {-1, n} duplicate id.
_ADMIT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {-1, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
redis.call('PUBLISH', ARGV[7], ARGV[5])
return {1, n + 1}
"""
)

# KEYS: admitted, queue, job key, in-progress key, abort. ARGV: job_id, now_ms, wake channel.
# Not started -> removed everywhere, it can never run (1). Running -> arq abort requested (0).
_CANCEL = """
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 0
"""

# KEYS: admitted, the worker's job set. ARGV: job_id, hold_ms. A job starts: re-arm its
# deadline (self-healing N) and record which worker runs it (for the reaper).
_START = (
    _NOW
    + """
redis.call('SADD', KEYS[2], ARGV[1])
return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
"""
)

# KEYS: admitted, the worker's job set. ARGV: job_id. A job ended, whatever the outcome.
_RELEASE = """
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# KEYS: admitted, the worker's job set, queue, job key, in-progress key. ARGV: job_id. A job
# that ended while Redis was unreachable: every trace arq and the worker could not remove.
_FORGET = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('DEL', KEYS[4], KEYS[5])
"""

# KEYS: workers index, admitted, queue. ARGV: worker key prefix, worker-jobs prefix, job key
# prefix, in-progress prefix, events prefix, the out-of-band error event's head ("0 error "),
# its JSON body. Workers whose heartbeat expired are dead: each job they had started loses
# its place, queue entry, in-progress marker and payload (it never runs again: at most
# once), and its client is told (an out-of-band error event). Idempotent; any process may
# run it. Returns {dead worker ids..., reaped job count}.
_REAP = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local jobs = 0
for _, w in ipairs(dead) do
  local set = ARGV[2] .. w
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('DEL', ARGV[3] .. id, ARGV[4] .. id)
    redis.call('PUBLISH', ARGV[5] .. id, ARGV[6] .. ARGV[7])
    jobs = jobs + 1
  end
  redis.call('DEL', set, ARGV[1] .. w)
  redis.call('ZREM', KEYS[1], w)
end
table.insert(dead, jobs)
return dead
"""
)

# KEYS: queue. ARGV: in-progress prefix, scan limit. Jobs in the queue that are not running.
_QUEUE_DEPTH = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local waiting = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then waiting = waiting + 1 end
end
return waiting
"""

# KEYS: queue. ARGV: in-progress prefix, now_ms, limit. Ids of jobs due and not running, oldest
# first: what a worker with free slots should try to start.
_WAITING_JOBS = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    table.insert(out, id)
    if #out >= tonumber(ARGV[3]) then break end
  end
end
return out
"""

# KEYS: worker hash, workers index. ARGV: worker_id, ttl_ms, field, value, field, value, ...
_HEARTBEAT = (
    _NOW
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: workers index. ARGV: worker key prefix. Hashes of live workers (expired ones are left
# in the index for the reaper, which needs them to find their jobs).
_LIVE_WORKERS = (
    _NOW
    + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local h = redis.call('HGETALL', ARGV[1] .. id)
  if #h > 0 then table.insert(out, h) end
end
return out
"""
)

_WORKER_PREFIX = p.worker_key("")


def log_reaped(logger: logging.Logger, dead: list[str], jobs: int) -> None:
    if dead:
        logger.warning(
            "worker(s) %s lost their heartbeat: %d started job(s) ended with worker_lost",
            ", ".join(dead),
            jobs,
        )


@dataclass(frozen=True, slots=True)
class AdmitResult:
    admitted: bool
    in_system: int  # N after the attempt: admitted jobs not yet finished
    duplicate: bool = False


class Store:
    """Typed access to the Redis contract; one per process, sharing a connection pool."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._cancel = redis.register_script(_CANCEL)
        self._start = redis.register_script(_START)
        self._release = redis.register_script(_RELEASE)
        self._reap = redis.register_script(_REAP)
        self._forget = redis.register_script(_FORGET)
        self._queue_depth = redis.register_script(_QUEUE_DEPTH)
        self._waiting = redis.register_script(_WAITING_JOBS)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._live = redis.register_script(_LIVE_WORKERS)

    # -- gateway side ------------------------------------------------------------------
    async def admit(
        self, spec: p.JobSpec, *, limit: int, hold_s: float, expire_s: float
    ) -> AdmitResult:
        """Admit and enqueue in one atomic step: nothing is ever half-enqueued.

        ``hold_s`` bounds how long the job may hold its place before it starts (then the
        worker re-arms it); ``expire_s`` is the arq job key's expiry (QUEUE_TIMEOUT_S).
        """
        payload = serialize_job(
            p.JOB_FUNCTION,
            (spec.model_dump(mode="json"),),
            {},
            1,
            spec.enqueued_at_ms,
            serializer=p.json_dumps,
        )
        status, n = await self._admit(
            keys=[p.ADMITTED, p.QUEUE, p.job_key(spec.id)],
            args=[
                limit,
                int(hold_s * 1000),
                payload,
                max(1, int(expire_s * 1000)),
                spec.id,
                spec.enqueued_at_ms,
                p.WAKE_CHANNEL,
            ],
        )
        return AdmitResult(admitted=status == 1, in_system=int(n), duplicate=status == -1)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job. True: it had not started and never will. False: abort requested."""
        started = await self._cancel(
            keys=[p.ADMITTED, p.QUEUE, p.job_key(job_id), p.in_progress_key(job_id), p.ABORT],
            args=[job_id, int(time.time() * 1000), p.WAKE_CHANNEL],
        )
        return bool(started == 1)

    async def queue_depth(self, scan_limit: int = 100_000) -> int:
        return int(await self._queue_depth(keys=[p.QUEUE], args=[p.IN_PROGRESS_PREFIX, scan_limit]))

    async def in_system(self) -> int:
        return int(await self.redis.zcard(p.ADMITTED))

    async def live_workers(self) -> list[p.WorkerInfo]:
        rows: list[list[bytes]] = await self._live(keys=[p.WORKERS], args=[_WORKER_PREFIX])
        out = []
        for row in rows:
            flat = dict(zip(row[::2], row[1::2], strict=True))
            out.append(p.WorkerInfo.from_hash(flat))
        return out

    # -- worker side -------------------------------------------------------------------
    async def waiting_jobs(self, limit: int) -> list[bytes]:
        """Up to ``limit`` queued jobs that are due and not running, oldest first."""
        ids: list[bytes] = await self._waiting(
            keys=[p.QUEUE], args=[p.IN_PROGRESS_PREFIX, int(time.time() * 1000), limit]
        )
        return ids

    async def mark_started(self, job_id: str, worker_id: str, hold_s: float) -> None:
        await self._start(
            keys=[p.ADMITTED, p.worker_jobs_key(worker_id)], args=[job_id, int(hold_s * 1000)]
        )

    async def release(self, job_id: str, worker_id: str) -> None:
        await self._release(keys=[p.ADMITTED, p.worker_jobs_key(worker_id)], args=[job_id])

    async def forget(self, job_id: str, worker_id: str) -> None:
        """Remove every trace of a job that ended while Redis was unreachable."""
        await self._forget(
            keys=[
                p.ADMITTED,
                p.worker_jobs_key(worker_id),
                p.QUEUE,
                p.job_key(job_id),
                p.in_progress_key(job_id),
            ],
            args=[job_id],
        )

    async def reap(self) -> tuple[list[str], int]:
        """Reclaim what dead workers held (see ``_REAP``); returns (dead worker ids, jobs).

        Each reclaimed job's client gets ``worker_lost`` as an out-of-band error event."""
        lost = WorkerLost("the worker running this job stopped (its heartbeat expired)")
        head = p.Event(p.OUT_OF_BAND, p.EventType.ERROR, b"").encode()
        out: list[Any] = await self._reap(
            keys=[p.WORKERS, p.ADMITTED, p.QUEUE],
            args=[
                _WORKER_PREFIX,
                p.WORKER_JOBS_PREFIX,
                p.job_key(""),
                p.IN_PROGRESS_PREFIX,
                p.EVENTS_PREFIX,
                head,
                json.dumps(lost.to_wire(), separators=(",", ":")),
            ],
        )
        return [w.decode() for w in out[:-1]], int(out[-1])

    async def publish(self, job_id: str, event: p.Event) -> int:
        """Publish one event; returns how many subscribers got it (0: nobody listens)."""
        return int(await self.redis.publish(p.events_channel(job_id), event.encode()))

    async def heartbeat(self, info: p.WorkerInfo, ttl_s: float) -> None:
        fields: list[Any] = []
        for k, v in info.to_hash().items():
            fields += [k, v]
        await self._heartbeat(
            keys=[p.worker_key(info.worker_id), p.WORKERS],
            args=[info.worker_id, int(ttl_s * 1000), *fields],
        )

    async def remove_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(p.worker_key(worker_id))
            pipe.zrem(p.WORKERS, worker_id)
            await pipe.execute()
