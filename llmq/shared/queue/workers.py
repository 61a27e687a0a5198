"""Workers in Redis: heartbeats, leaving, the reaper of dead workers' jobs, and requeueing
a worker's lost claims; each script defined here. ``Workers`` is ``Store.workers``; how a
process runs the reaper around outages is ``queue.failover``'s ``OutageReaper``."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.errors import WorkerLost
from llmq.shared.protocol import OUTCOME_TTL_MS, StoredStatus
from llmq.shared.queue import names
from llmq.shared.queue.batch_records import failure_line
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.queue.migration import MIGRATION_CONSTS, MOVE_LUA
from llmq.shared.queue.waiting import out_of_band

# Workers whose heartbeat expired are dead (their records of cached prefixes go with them).
# Each job they had started (or picked) is handed over to another worker when it can be
# (``queue.migration``: fewer than ``migrate_max`` migrations, 0 with MIGRATE off; another
# live worker ready for its model; not a batch line): its in-progress marker and arq's try
# counter go, and it waits at the head of its model's queue with its places, log and record.
# Any other job loses its places, queue entry, in-progress marker and payload (it never runs
# again: at most once), gets the outcome record ``outcome_record``, and its client is told
# (``error_event``, out of band; logged too for a stored job, whose status becomes failed;
# another job's progress log is deleted). A batch request's error line is ``failure_line``
# (batch_records.failure_line's, rendered in Python) with its id and custom_id (read from
# arq's payload) filled in, counted as failed, never run again. Idempotent; any process may
# run it. Returns {dead worker ids..., ended job count, migrated job count}.
REAP = Script(
    keys=("workers", "queue"),
    args=("model_prefix", "worker_prefix", "worker_jobs_prefix", "worker_claims_prefix",
          "job_prefix", "in_progress_prefix",
          "events_prefix", "error_event", "tenant_prefix", "outcome_prefix", "outcome_record",
          "outcome_ttl_ms", "stored_prefix", "log_prefix", "store_ttl_ms", "batch_job_prefix",
          "batch_prefix", "failure_line", "worker_prefixes_prefix", "migrate_max"),
    consts={**MIGRATION_CONSTS,
        "TENANT_ADMITTED": names.TENANT_ADMITTED_SUFFIX,
        "MODEL_ADMITTED": names.ADMITTED_PART,
        "INFLIGHT": ":" + names.BATCH_INFLIGHT,
        "ERR": ":" + names.BATCH_ERR,
        "FAILED": StoredStatus.FAILED.value,
        "LINE_ID": '"@@ID@@"',
        "LINE_CUSTOM_ID": '"@@CUSTOM_ID@@"',
    },
    clock=True,
    body=MOVE_LUA + """
local function batch_line(id, bid, index)
  local custom = ''
  local payload = redis.call('GET', job_prefix .. id)
  if payload then
    local ok, job = pcall(cjson.decode, payload)
    if ok then custom = job['a'][1]['custom_id'] or '' end
  end
  local line = failure_line:gsub(LINE_ID, function() return cjson.encode(id) end)
  line = line:gsub(LINE_CUSTOM_ID, function() return cjson.encode(custom) end)
  redis.call('HSET', batch_prefix .. bid .. ERR, index, line)
  redis.call('HINCRBY', batch_prefix .. bid, 'failed', 1)
end
local dead = redis.call('ZRANGEBYSCORE', workers, '-inf', now)
local jobs, migrated = 0, 0
for _, w in ipairs(dead) do
  local records = worker_jobs_prefix .. w
  local pairs_ = redis.call('HGETALL', records)
  for _, x in ipairs(redis.call('HGETALL', worker_claims_prefix .. w)) do
    table.insert(pairs_, x)  -- picked, maybe started: as started ones (at most once)
  end
  for i = 1, #pairs_, 2 do
    local id, tenant, model, band = pairs_[i], pairs_[i + 1], nil, nil
    local ok, v = pcall(cjson.decode, tenant)  -- [tenant, model, band, ...]
    if ok and type(v) == 'table' then tenant, model, band = v[1], v[2], v[3] end
    local bid, index = string.match(id, '^' .. batch_job_prefix .. '(.+)_(%d+)$')
    if not bid and model and band and move(id, model, 'worker_lost', migrate_max, w) then
      redis.call('DEL', in_progress_prefix .. id, M_RETRY_PREFIX .. id)
      queue_resumed(model, band .. M_SEP .. tenant .. M_SEP .. id)
      migrated = migrated + 1
    else
      if model then redis.call('ZREM', model_prefix .. model .. MODEL_ADMITTED, id) end
      redis.call('ZREM', tenant_prefix .. tenant .. TENANT_ADMITTED, id)
      redis.call('ZREM', queue, id)
      if bid and redis.call('SREM', batch_prefix .. bid .. INFLIGHT, id) == 1 then
        batch_line(id, bid, index)
      end
      redis.call('DEL', job_prefix .. id, in_progress_prefix .. id, M_MOVES_PREFIX .. id)
      redis.call('SET', outcome_prefix .. id, outcome_record, 'PX', outcome_ttl_ms)
      redis.call('PUBLISH', events_prefix .. id, error_event)
      if redis.call('EXISTS', stored_prefix .. id) == 1 then
        redis.call('HSET', stored_prefix .. id, 'status', FAILED)
        redis.call('XADD', log_prefix .. id, '*', 'e', error_event)
        redis.call('PEXPIRE', stored_prefix .. id, store_ttl_ms)
        redis.call('PEXPIRE', log_prefix .. id, store_ttl_ms)
      else
        redis.call('DEL', log_prefix .. id)  -- its progress: nobody continues it
      end
      jobs = jobs + 1
    end
  end
  redis.call('DEL', records, worker_claims_prefix .. w, worker_prefix .. w,
             worker_prefixes_prefix .. w)
  redis.call('ZREM', workers, w)
end
table.insert(dead, jobs)
table.insert(dead, migrated)
return dead
""",
)  # fmt: skip


# A worker's claims older than ``min_age_ms`` whose job it is not running (``running``: the
# ids it holds) never started: a pick whose reply was lost (Redis failed over or dropped
# the connection after running the script). Each goes back to its tenant's queue in its
# band, under its deadline (its enqueue score, from a pick of an older version), and its
# model's workers are woken; a claim whose job ended or expired is dropped. Returns the
# number requeued.
REQUEUE = Script(
    keys=("claims", "queue"),
    args=("job_prefix", "in_progress_prefix", "model_prefix", "wake", "min_age_ms"),
    rest="running",
    consts={
        "SEP": names.BAND_QUEUE_SEP,
        "BAND_PART": names.BAND_PART,
        "WAKE_MODEL": names.WAKE_MODEL,
    },
    clock=True,
    body="""
local skip = {}
for _, id in ipairs(running) do skip[id] = true end
local flat = redis.call('HGETALL', claims)
local n = 0
for i = 1, #flat, 2 do
  local id = flat[i]
  local c = cjson.decode(flat[i + 1])  -- {tenant, model, band, score, claimed ms, due ms}
  if not skip[id] and now - tonumber(c[5]) >= tonumber(min_age_ms) then
    redis.call('HDEL', claims, id)
    if redis.call('EXISTS', job_prefix .. id) == 1 and redis.call('ZSCORE', queue, id) then
      local index = model_prefix .. c[2] .. BAND_PART .. c[3]
      redis.call('DEL', in_progress_prefix .. id)
      redis.call('ZADD', index .. SEP .. c[1], c[6] or c[4], id)
      redis.call('ZADD', index, 'NX', 0, c[1])
      redis.call('PUBLISH', wake, WAKE_MODEL .. c[2])
      n = n + 1
    end
  end
end
return n
""",
)


# One worker's heartbeat (``fields``: field/value pairs), live for ``ttl_ms``; the models it
# serves (``models_json``, a JSON list) are remembered in ``models`` as seen now.
HEARTBEAT = Script(
    keys=("worker", "workers", "models"),
    args=("worker_id", "ttl_ms", "models_json"),
    rest="fields",
    clock=True,
    body="""
for _, m in ipairs(cjson.decode(models_json)) do redis.call('ZADD', models, now, m) end
redis.call('DEL', worker)
redis.call('HSET', worker, unpack(fields))
redis.call('PEXPIRE', worker, ttl_ms)
redis.call('ZADD', workers, now + tonumber(ttl_ms), worker_id)
return 1
""",
)

# A dead worker's batch request: its error line, with the placeholders the reap script fills.
_REAPED_BATCH_LINE = failure_line(
    "@@ID@@", "@@CUSTOM_ID@@", "worker_lost", "the worker running it stopped"
)


class Workers:
    """Workers' records (``Store.workers``): the scripts of this module, loaded into one
    client."""

    def __init__(self, redis: Redis, store_ttl_s: float = 3600.0, migrate_max: int = 0) -> None:
        """``migrate_max``: MIGRATE_MAX (0: MIGRATE off), the migrations a dead worker's
        job may have had before it is ended instead of handed over."""
        self.redis = redis
        self.store_ttl_ms = int(store_ttl_s * 1000)  # STORE_TTL_S: a reaped job's record
        self.migrate_max = migrate_max
        self._reap = Registered(redis, REAP)
        self._heartbeat = Registered(redis, HEARTBEAT)
        self._requeue = Registered(redis, REQUEUE)

    async def requeue_claims(self, worker_id: str, running: list[str], min_age_s: float) -> int:
        """Return to the queue the jobs this worker picked at least ``min_age_s`` ago and
        is not running (``running``: every job id it holds or has started): a pick whose
        reply never arrived. See ``REQUEUE``."""
        return int(
            await self._requeue(
                keys={"claims": names.worker_claims_key(worker_id), "queue": names.QUEUE},
                args={
                    "job_prefix": names.job_key(""),
                    "in_progress_prefix": names.IN_PROGRESS_PREFIX,
                    "model_prefix": names.MODEL_PREFIX,
                    "wake": names.WAKE_CHANNEL,
                    "min_age_ms": int(min_age_s * 1000),
                },
                rest=running,
            )
        )

    async def heartbeat(self, info: p.WorkerInfo, ttl_s: float) -> None:
        await self._heartbeat(
            keys={
                "worker": names.worker_key(info.worker_id),
                "workers": names.WORKERS,
                "models": names.MODELS,
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
        await self.redis.zremrangebyscore(names.MODELS, "-inf", f"({before_ms}")

    async def remove_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(names.worker_key(worker_id), names.worker_prefixes_key(worker_id))
            pipe.zrem(names.WORKERS, worker_id)
            await pipe.execute()

    async def reap(self) -> tuple[list[str], int, int]:
        """Reclaim what dead workers held (see ``REAP``); returns (dead worker ids, jobs
        ended, jobs handed over to other workers).

        Each ended job's client gets ``worker_lost`` as an out-of-band error event."""
        lost = WorkerLost("the worker running this job stopped (its heartbeat expired)")
        out: list[Any] = await self._reap(
            keys={"workers": names.WORKERS, "queue": names.QUEUE},
            args={
                "model_prefix": names.MODEL_PREFIX,
                "worker_prefix": names.WORKER_PREFIX,
                "worker_jobs_prefix": names.WORKER_JOBS_PREFIX,
                "worker_claims_prefix": names.WORKER_CLAIMS_PREFIX,
                "job_prefix": names.job_key(""),
                "in_progress_prefix": names.IN_PROGRESS_PREFIX,
                "events_prefix": names.EVENTS_PREFIX,
                "error_event": out_of_band(lost),
                "tenant_prefix": names.TENANT_PREFIX,
                "outcome_prefix": names.OUTCOME_PREFIX,
                "outcome_record": p.outcome_record(p.Outcome.WORKER_LOST),
                "outcome_ttl_ms": OUTCOME_TTL_MS,
                "stored_prefix": names.STORED_PREFIX,
                "log_prefix": names.LOG_PREFIX,
                "store_ttl_ms": self.store_ttl_ms,
                "batch_job_prefix": names.BATCH_JOB_PREFIX,
                "batch_prefix": names.BATCH_PREFIX,
                "failure_line": _REAPED_BATCH_LINE,
                "worker_prefixes_prefix": names.WORKER_PREFIXES_PREFIX,
                "migrate_max": self.migrate_max,
            },
        )
        return [w.decode() for w in out[:-2]], int(out[-2]), int(out[-1])
