"""Migration: a started job whose worker is lost (heartbeat gone), whose engine failed, or
whose worker drains past DRAIN_TIMEOUT_S goes to another worker, which continues it from
what its client already has, instead of ending with ``worker_lost``.

What a job has produced is its log (``llmq:log:<id>``): with MIGRATE on, every job's
non-terminal events are logged as a stored job's are (in the same pipeline as their
PUBLISH, so whatever a client saw is there), and deleted when the job ends. A job handed over
keeps its places, its log and its stored record; its arq payload and queue score are copied
into its moves record (``llmq:moves:<id>``, which counts its migrations), and it waits in
its model's ``llmq:model:<m>:resume``, which every pick takes from before any band. The
pick restores its payload and queue entry and claims it as it claims any job; the worker
that runs it reads the log and continues (``worker.continuation``).

Two ways in:

- the reaper (``queue.workers``' REAP), for a dead worker's jobs: handed over and queued
  for resumption in one step;
- the worker itself (``HAND_OVER``, then ``RESUME`` once arq has finished the job's run:
  arq's end of a run deletes the payload and queue entry that the pick restores, so the job
  becomes pickable only after it).

A job is handed over only while it moved fewer than MIGRATE_MAX times, its payload is still
there, and another live worker has a ready engine serving its model; otherwise it ends as
before (``worker_lost``, or the engine's error).
"""

from __future__ import annotations

from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.lua import Registered, Script

# Constants the Lua below needs (add them to a script's consts).
MIGRATION_CONSTS: dict[str, str | int | tuple[str, ...]] = {
    "M_MOVES_PREFIX": names.MOVES_PREFIX,
    "M_JOB_PREFIX": names.job_key(""),
    "M_QUEUE": names.QUEUE,
    "M_RETRY_PREFIX": names.RETRY_PREFIX,
    "M_MODEL_PREFIX": names.MODEL_PREFIX,
    "M_RESUME_PART": names.RESUME_PART,
    "M_WAKE": names.WAKE_CHANNEL,
    "M_WAKE_MODEL": names.WAKE_MODEL,
    "M_WORKERS": names.WORKERS,
    "M_WORKER_PREFIX": names.WORKER_PREFIX,
    "M_SEP": names.BAND_QUEUE_SEP,
}

# ready_elsewhere(model, self_id): whether a live worker other than ``self_id`` has a ready
# engine serving ``model``. move(id, model, why, most, self_id): hand the job over (see the
# module docstring); true when it was. queue_resumed(model, member): it waits at the head
# of its model's queue, and the model's workers are woken.
MOVE_LUA = """
local function ready_elsewhere(model, self_id)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', M_WORKERS, '(' .. now, '+inf')) do
    if w ~= self_id then
      local h = redis.call('HMGET', M_WORKER_PREFIX .. w, 'engine_ready', 'models')
      if h[1] == '1' then
        local ok, ms = pcall(cjson.decode, h[2] or '[]')
        if ok and type(ms) == 'table' then
          for _, m in ipairs(ms) do if m == model then return true end end
        end
      end
    end
  end
  return false
end
local function move(id, model, why, most, self_id)
  local moves = M_MOVES_PREFIX .. id
  local n = tonumber(redis.call('HGET', moves, 'n')) or 0
  if n >= tonumber(most) then return false end
  local payload = redis.call('GET', M_JOB_PREFIX .. id)
  local score = redis.call('ZSCORE', M_QUEUE, id)
  if not payload or not score or not ready_elsewhere(model, self_id) then return false end
  redis.call('HSET', moves, 'n', n + 1, 'p', payload, 's', score, 'why', why)
  local ttl = redis.call('PTTL', M_JOB_PREFIX .. id)
  if ttl > 0 then redis.call('PEXPIRE', moves, ttl) end
  return true
end
local function queue_resumed(model, member)
  redis.call('ZADD', M_MODEL_PREFIX .. model .. M_RESUME_PART, now, member)
  redis.call('PUBLISH', M_WAKE, M_WAKE_MODEL .. model)
end
"""

# Inside the pick (``queue.routing``): take_resumed(model) claims the model's migrated jobs,
# oldest hand-over first, before any band's: each one's payload and queue entry restored
# from its moves record (which keeps n), arq's try counter reset, claimed as any pick claims
# (due 0: a lost pick requeues it at the head of its key's queue). An entry whose record
# went (the job ended, was cancelled or expired) is dropped; one whose job is still marked
# in progress waits (a hand-over before arq finished its run). Its reply row's last field is
# the job's migrations so far (0 for any other job).
RESUMED_PICK_LUA = """
local function take_resumed(model)
  local key = M_MODEL_PREFIX .. model .. M_RESUME_PART
  while taken < want do
    local first = redis.call('ZRANGE', key, 0, 0)
    if #first == 0 then return end
    local band, tenant, id = string.match(first[1], '^([^:]+):([^:]+):(.+)$')
    if id and redis.call('EXISTS', in_progress_prefix .. id) == 1 then return end
    redis.call('ZREM', key, first[1])
    local moves = M_MOVES_PREFIX .. (id or '')
    local h = redis.call('HMGET', moves, 'p', 's', 'n')
    if id and h[1] then
      local keep = math.max(redis.call('PTTL', moves), tonumber(claim_ms))
      redis.call('SET', M_JOB_PREFIX .. id, h[1], 'PX', keep)
      redis.call('ZADD', M_QUEUE, h[2], id)
      redis.call('DEL', M_RETRY_PREFIX .. id)
      redis.call('HDEL', moves, 'p')
      redis.call('PSETEX', in_progress_prefix .. id, claim_ms, '1')
      redis.call('HSET', claims, id, cjson.encode({tenant, model, band, tonumber(h[2]), now, 0}))
      for _, v in ipairs({id, h[2], 0, 0, -1, h[3]}) do table.insert(out, v) end
      taken = taken + 1
    end
  end
end
"""

# The worker hands one of its running jobs over (its engine failed, or it drains): it leaves
# the worker's records. 1: handed over (queue it with RESUME once arq finished its run); 0:
# not (it ends here as before).
HAND_OVER = Script(
    keys=("worker_jobs", "claims"),
    args=("job_id", "model", "why", "most", "worker_id"),
    consts=MIGRATION_CONSTS,
    clock=True,
    body=MOVE_LUA
    + """
if not move(job_id, model, why, most, worker_id) then return 0 end
redis.call('HDEL', worker_jobs, job_id)
redis.call('HDEL', claims, job_id)
return 1
""",
)

# A job handed over (HAND_OVER) waits for a worker now, unless it went meanwhile.
RESUME = Script(
    keys=("moves",),
    args=("model", "member"),
    consts=MIGRATION_CONSTS,
    clock=True,
    body=MOVE_LUA
    + """
if redis.call('HEXISTS', moves, 'p') == 0 then return 0 end
queue_resumed(model, member)
return 1
""",
)


class Migration:
    """A worker's side of migration (``Store.migration``); the reaper's is in REAP."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._hand_over = Registered(redis, HAND_OVER)
        self._resume = Registered(redis, RESUME)

    async def hand_over(self, spec: p.JobSpec, worker_id: str, why: str, most: int) -> bool:
        """Give a running job up to another worker (see ``HAND_OVER``): True when it will
        be resumed there (call ``resume`` once arq finished the run), False when it was not
        handed over (it moved ``most`` times, or no other worker can take it)."""
        out = await self._hand_over(
            keys={
                "worker_jobs": names.worker_jobs_key(worker_id),
                "claims": names.worker_claims_key(worker_id),
            },
            args={
                "job_id": spec.id,
                "model": spec.model,
                "why": why,
                "most": most,
                "worker_id": worker_id,
            },
        )
        return bool(int(out))

    async def resume(self, spec: p.JobSpec) -> bool:
        """Queue a handed-over job for the next worker (at the head of its model's queue)."""
        out = await self._resume(
            keys={"moves": names.moves_key(spec.id)},
            args={
                "model": spec.model,
                "member": names.deadline_member(spec.band.value, spec.tenant, spec.id),
            },
        )
        return bool(int(out))

    async def why(self, job_id: str) -> str:
        """Why the job was last handed over (``worker_lost``, ``engine_error``,
        ``engine_stall``, ``drain``; "" when it never was)."""
        raw = await self.redis.hget(names.moves_key(job_id), "why")  # type: ignore[misc]
        return raw.decode() if isinstance(raw, bytes) else str(raw or "")
