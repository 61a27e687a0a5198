"""Routing: how a request for a model reaches a worker that serves it, and the pick.

The model -> worker path, in order (each step one file):

1. Gateway, ``gateway/registry.py``: the model name is resolved (MODEL_ALIASES) and checked
   against the models live workers serve, from their heartbeats (unknown: 404; none ready:
   503); the model's capacity is the sum of its ready workers' slots.
2. Gateway, ``gateway/admission.py`` -> ``queue/jobs.py`` (``Jobs.admit``): the job is
   bounded by its model's capacity and queued in the model's band queue for its key
   (``llmq:model:<m>:band:<band>:<key>``), and ``llmq:wake`` is told the model.
3. Worker, ``worker/heartbeat.py``: its heartbeat says which models its engine serves
   (``queue/workers.py``), and its wake listener wakes the poll loop when one of its
   models gets a job.
4. Worker, ``worker/arq_worker.py``: the poll loop asks this module's ``Routing.pick`` for
   as many jobs as it has free slots, for the models it serves, and runs them.

The pick (``PICK``), which waiting jobs a worker starts in its free slots, fair first, then
warm:

Fairness decides first, as it always did: the highest band with a waiting job; within a
band, the model served least recently (llmq:models:served), so a worker serving several
models shares its slots among them; within the model, the API key (tenant) served least
recently (scores are a counter, ``served``, so ties cannot happen; a key that just got work
queued counts as never served: score 0). That key's queue is where the job comes from.

Cache-aware pickup (``affinity`` "1") then chooses among that key's oldest ``window`` jobs,
by their prefix signatures (``shared.prefix``, in ``llmq:prefix:<id>``) and the workers'
records of what their engines hold (``llmq:worker-prefixes:<id>``, found through the index
``llmq:prefix-owners``):

- A job whose prefix another live worker with a free slot holds deeper than this one is
  *left* to it: that worker was woken for it too and takes it in a moment. It is left for at
  most ``max_wait_ms`` from the first time a pick left it (``p`` in its prefix hash); after
  that, any worker takes it. The reply's first number is when the earliest left job's wait
  runs out (ms, -1: none left), so the worker looks again then.
- Among the jobs not left, the oldest is taken, unless a later one's prefix is held deeper
  here: then that one is taken, passing over the older ones, as long as none of them was
  first passed over (or left) ``max_wait_ms`` ago or more. Under load, when every slot is
  busy, this is what keeps a conversation on its engine: the slot that frees takes the job
  its engine holds, and the job passed over takes the next slot.

So affinity holds a job back at most ``max_wait_ms`` from the first time a pick could have
taken it and did not; after that it is taken by the next pick that reaches it in the fair
order. When a key's window holds only left jobs, the pick moves to the next key.

A job taken is claimed in the same step (arq's in-progress key, for ``claim_ms``, as arq's
start_jobs would set it in four round trips of its own) and recorded in the worker's
``claims`` until it starts (REQUEUE returns a claim whose start never came); its prefix
hashes join this worker's record (score now, unless picked here within ``REFRESH_MS``;
older than ``record_ttl_ms`` or beyond ``record_max`` entries dropped) and the index
(bounded by ``index_max``), and its prefix hash is deleted. Jobs that expired, already
run or left the queue are dropped on the way.

Before any of that, each model's waiting jobs whose time-to-first-token deadline passed are
dropped (``queue.waiting``): a job that would start late is never sent to the engine. Then
each model's migrated jobs are taken (``queue.migration``): a job handed over by a lost
worker goes on before anything new starts.

Returns {retry ms, {model, late jobs dropped, ...}, then per job: id, queue score, depth held
here, deepest held by a live worker, ms it was left (-1: never), its migrations (0: none)}.
(The queue score is the gateway's enqueue time: unlike arq, never compared with now, as
nothing here is deferred and the gateway's clock may be ahead of the worker's; a job dropped
for that was lost.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from llmq.shared.protocol import BANDS
from llmq.shared.queue import names
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.queue.migration import MIGRATION_CONSTS, RESUMED_PICK_LUA
from llmq.shared.queue.waiting import LATE_LUA, REMOVE_LUA, WAITING_CONSTS, dropped_of, late_args

# A prefix this worker picked less than this long ago is not written again (its record's
# score, its place in the index): a hot system prompt costs its writes once a second.
REFRESH_MS = 1000
DROP_MOST = 64  # late jobs a pick drops per model before it takes any


_HELPERS = """
local taken, want = 0, tonumber(limit)
local aff, max_wait = affinity == '1', tonumber(max_wait_ms)
local floor = now - tonumber(record_ttl_ms)
local retry = -1
local alive, free, serves = {}, {}, {}

local function live(w)
  if alive[w] == nil then alive[w] = (tonumber(redis.call('ZSCORE', workers, w)) or 0) > now end
  return alive[w]
end

-- free slots of worker w for model (0 unless live, ready and serving it)
local function free_slots(w, model)
  if free[w] == nil then
    free[w] = 0
    if live(w) then
      local h = redis.call('HMGET', worker_prefix .. w, 'max_active', 'engine_ready', 'models')
      if h[2] == '1' then
        free[w] = (tonumber(h[1]) or 0) - redis.call('HLEN', worker_jobs_prefix .. w)
                  - redis.call('HLEN', worker_claims_prefix .. w)
        local ok, ms = pcall(cjson.decode, h[3] or '[]')
        serves[w] = {}
        if ok and type(ms) == 'table' then for _, m in ipairs(ms) do serves[w][m] = true end end
      end
    end
  end
  if free[w] > 0 and serves[w][model] then return free[w] end
  return 0
end

-- a candidate: its prefix hashes, the depth this worker holds, the deepest a live worker
-- holds, whether a live worker with a free slot holds it deeper than this one
local function look(id, model)
  local c = {id = id, own = 0, best = 0, warm = false}
  if not aff then return c end
  local raw = redis.call('HMGET', prefix_prefix .. id, 'h', 'p')
  if not raw[1] then return c end
  local hs = {}
  for h in string.gmatch(raw[1], '%S+') do table.insert(hs, h) end
  if #hs == 0 then return c end
  c.hs, c.p = hs, tonumber(raw[2])
  local mine = redis.call('ZMSCORE', records, unpack(hs))
  c.mine = mine
  for i = #hs, 1, -1 do
    if mine[i] and tonumber(mine[i]) >= floor then c.own = i break end
  end
  c.best = c.own
  local owner = redis.call('HMGET', owners, unpack(hs))
  c.owner = owner
  for i = #hs, c.own + 1, -1 do
    local w = owner[i]
    if w and w ~= worker_id and live(w) then
      local s = tonumber(redis.call('ZSCORE', records_prefix .. w, hs[i]))
      if s and s >= floor then
        if c.best < i then c.best = i end
        if free_slots(w, model) > 0 then c.warm = true break end
      end
    end
  end
  return c
end

local function may_wait(c) return c.p == nil or now - c.p < max_wait end

-- c is left to another worker (or passed over for one): its wait starts now, once
local function hold(c)
  if c.p == nil then
    c.p = now
    redis.call('HSET', prefix_prefix .. c.id, 'p', now)
  end
  local left = max_wait - (now - c.p)
  if retry < 0 or left < retry then retry = left end
end

-- the job to take from a key's queue, and how many of its window were left to others
local function choose(tenant_queue, model)
  local last = 0
  if aff then last = tonumber(window) - 1 end
  local cands, held = {}, 0
  for _, id in ipairs(redis.call('ZRANGE', tenant_queue, 0, last)) do
    local score = tonumber(redis.call('ZSCORE', queue, id))
    if score and redis.call('EXISTS', job_prefix .. id) == 1
        and redis.call('EXISTS', in_progress_prefix .. id) == 0 then
      local c = look(id, model)
      c.score = score
      if c.warm and may_wait(c) then
        hold(c)
        held = held + 1
      else
        table.insert(cands, c)
      end
    else
      redis.call('ZREM', tenant_queue, id)  -- expired, ran, or left the queue
    end
  end
  if #cands == 0 then return nil, held end
  local at = 1
  for i = 2, #cands do
    if cands[i].own > cands[at].own then
      local ok = true
      for j = 1, i - 1 do if not may_wait(cands[j]) then ok = false end end
      if ok then at = i end
    end
  end
  for j = 1, at - 1 do hold(cands[j]) end
  return cands[at], held
end

-- what this worker's engine now holds: the job's prefix hashes. Only what changed is
-- written: a hash this worker picked less than REFRESH_MS ago keeps its score, and the
-- index is set only where another worker (or none) was its owner.
local function record(c)
  if not c.hs then return end
  local scored, owned = {}, {}
  for i, h in ipairs(c.hs) do
    local last = c.mine[i] and tonumber(c.mine[i])
    if not last or now - last >= REFRESH_MS then
      table.insert(scored, now)
      table.insert(scored, h)
    end
    if c.owner[i] ~= worker_id then
      table.insert(owned, h)
      table.insert(owned, worker_id)
    end
  end
  if #scored > 0 then
    redis.call('ZADD', records, unpack(scored))
    redis.call('ZREMRANGEBYSCORE', records, '-inf', '(' .. floor)
    local excess = redis.call('ZCARD', records) - tonumber(record_max)
    if excess > 0 then redis.call('ZREMRANGEBYRANK', records, 0, excess - 1) end
    redis.call('PEXPIRE', records, record_ttl_ms)
    redis.call('ZADD', seen, unpack(scored))
  end
  if #owned > 0 then redis.call('HSET', owners, unpack(owned)) end
  local over = redis.call('ZCARD', seen) - tonumber(index_max)
  if over > 0 and over * 16 >= tonumber(index_max) then  -- trimmed in batches
    redis.call('HDEL', owners, unpack(redis.call('ZRANGE', seen, 0, over - 1)))
    redis.call('ZREMRANGEBYRANK', seen, 0, over - 1)
  end
end
"""


_BODY = (
    """
local out = {0, {}}
"""
    + RESUMED_PICK_LUA
    + """
for _, m in ipairs(models) do
  local n = drop_late(m, DROP_MOST)
  if n > 0 then table.insert(out[2], m) table.insert(out[2], n) end
end
for _, m in ipairs(models) do take_resumed(m) end
local skipped, nskipped = {}, {}
for _, band in ipairs(BANDS) do
  local waiting = {}
  for _, m in ipairs(models) do
    local index = model_prefix .. m .. BAND_PART .. band
    if redis.call('EXISTS', index) == 1 then table.insert(waiting, {m, index}) end
  end
  while taken < want and #waiting > 0 do
    local best, best_score = 1, nil
    for i, w in ipairs(waiting) do
      local s = tonumber(redis.call('ZSCORE', models_served, w[1])) or 0
      if best_score == nil or s < best_score then best, best_score = i, s end
    end
    local model, index = waiting[best][1], waiting[best][2]
    local tenant = nil
    for _, t in ipairs(redis.call('ZRANGE', index, 0, nskipped[index] or 0)) do
      if not skipped[index .. SEP .. t] then tenant = t break end
    end
    if tenant then
      local tenant_queue = index .. SEP .. tenant
      local c, held = choose(tenant_queue, model)
      if c then
        local id = c.id
        local due = tonumber(redis.call('ZSCORE', tenant_queue, id))
        redis.call('ZREM', tenant_queue, id)
        redis.call('PSETEX', in_progress_prefix .. id, claim_ms, '1')
        redis.call('HSET', claims, id, cjson.encode({tenant, model, band, c.score, now, due}))
        record(c)
        redis.call('DEL', prefix_prefix .. id)
        local left = -1
        if c.p then left = now - c.p end
        for _, v in ipairs({id, c.score, c.own, c.best, left, 0}) do table.insert(out, v) end
        taken = taken + 1
        local tick = redis.call('INCR', served)
        redis.call('ZADD', index, 'XX', tick, tenant)
        redis.call('ZADD', models_served, tick, model)
      elseif held > 0 then  -- its window is left to warmer workers: the next key
        skipped[tenant_queue] = true
        nskipped[index] = (nskipped[index] or 0) + 1
      end
      if redis.call('ZCARD', tenant_queue) == 0 then redis.call('ZREM', index, tenant) end
    end
    if tenant == nil or redis.call('EXISTS', index) == 0 then table.remove(waiting, best) end
  end
  if taken >= want then break end
end
out[1] = retry
return out
"""
)


PICK = Script(
    keys=("queue", "served", "models_served", "claims", "workers", "records", "owners", "seen"),
    args=("in_progress_prefix", "job_prefix", "model_prefix", "limit", "claim_ms", "worker_id",
          "affinity", "max_wait_ms", "window", "record_max", "record_ttl_ms", "index_max",
          "prefix_prefix", "worker_prefix", "worker_jobs_prefix", "worker_claims_prefix",
          "records_prefix", "late_event", "late_outcome"),
    rest="models",
    consts={**WAITING_CONSTS, **MIGRATION_CONSTS, "SEP": names.BAND_QUEUE_SEP,
            "BAND_PART": names.BAND_PART,
            "BANDS": BANDS, "REFRESH_MS": REFRESH_MS, "DROP_MOST": DROP_MOST},
    clock=True,
    body=REMOVE_LUA + LATE_LUA + _HELPERS + _BODY,
)  # fmt: skip

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
    moves: int = 0  # a migrated job: its migrations so far (``queue.migration``)

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
    dropped: dict[str, int] = field(default_factory=dict)  # late jobs dropped, per model


class Routing:
    """The pick (``Store.routing``), loaded into one client."""

    def __init__(self, redis: Redis) -> None:
        self._pick = Registered(redis, PICK)

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
        worker's engine holds (``PICK``)."""
        if not models:
            return PickResult()
        a = affinity or Affinity()
        flat: list[Any] = await self._pick(
            keys={
                "queue": names.QUEUE,
                "served": names.BAND_SERVED,
                "models_served": names.MODELS_SERVED,
                "claims": names.worker_claims_key(worker_id),
                "workers": names.WORKERS,
                "records": names.worker_prefixes_key(worker_id),
                "owners": names.PREFIX_OWNERS,
                "seen": names.PREFIX_SEEN,
            },
            args={
                "in_progress_prefix": names.IN_PROGRESS_PREFIX,
                "job_prefix": names.job_key(""),
                "model_prefix": names.MODEL_PREFIX,
                "limit": limit,
                "claim_ms": max(1, int(in_progress_s * 1000)),
                "worker_id": worker_id,
                "affinity": "1" if affinity else "0",
                "max_wait_ms": a.max_wait_ms,
                "window": WINDOW,
                "record_max": a.record_max,
                "record_ttl_ms": int(a.ttl_s * 1000),
                "index_max": INDEX_MAX,
                "prefix_prefix": names.PREFIX_PREFIX,
                "worker_prefix": names.WORKER_PREFIX,
                "worker_jobs_prefix": names.WORKER_JOBS_PREFIX,
                "worker_claims_prefix": names.WORKER_CLAIMS_PREFIX,
                "records_prefix": names.WORKER_PREFIXES_PREFIX,
                **late_args(),
            },
            rest=models,
        )
        jobs = [
            Picked(flat[i].decode(), *(int(v) for v in flat[i + 1 : i + 6]))
            for i in range(2, len(flat), 6)
        ]
        return PickResult(jobs, int(flat[0]), dropped_of(flat[1]))

    async def pick_jobs(
        self, models: tuple[str, ...], limit: int, in_progress_s: float, worker_id: str = ""
    ) -> list[tuple[str, int]]:
        """``pick`` without affinity: (id, queue score) of each job claimed."""
        result = await self.pick(models, limit, in_progress_s, worker_id)
        return [(j.id, j.score) for j in result.jobs]
