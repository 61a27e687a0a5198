"""A waiting job taken out of the queue by the service itself, never run: displaced from a
full queue (``queue.jobs``' admit), or dropped because its time-to-first-token deadline
passed (this module's ``drop_late``, run by the pick and by each worker's sweep).

The Lua here is shared by the scripts that remove such jobs: ``REMOVE_LUA`` takes one job out
of every queue and place it holds, leaves its outcome, fails a stored job's record (the
error in its log) and tells whoever waits for it; ``LATE_LUA`` drops a model's jobs whose
deadline passed. A job with a deadline that may be dropped (an objective, not best-effort)
is in its model's ``model_deadlines_key`` zset, scored by its deadline, until it starts
(``START`` removes it) or its deadline comes (a job that ended otherwise, cancelled or
expired, only leaves the zset then; started jobs are never touched).
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.errors import DeadlineUnattainable, ServiceError
from llmq.shared.protocol import OUTCOME_TTL_MS, StoredStatus
from llmq.shared.queue import names
from llmq.shared.queue.lua import Registered, Script


def out_of_band(err: ServiceError) -> bytes:
    """An out-of-band error event (seq 0), as the reaper, a cancel and a drop publish it."""
    data = json.dumps(err.to_wire(), separators=(",", ":")).encode()
    return p.Event(p.OUT_OF_BAND, p.EventType.ERROR, data).encode()


# What a job dropped at its deadline is told (a 429: the service is too busy for it now).
LATE = DeadlineUnattainable(
    "the request's time-to-first-token objective passed while it waited in the queue; it "
    "was not run. Retry later, or send X-Deadline-Policy: best-effort to wait anyway"
)
LATE_EVENT = out_of_band(LATE)

# Constants the Lua below needs (add them to a script's consts).
WAITING_CONSTS: dict[str, str | int | tuple[str, ...]] = {
    "ARQ_QUEUE": names.QUEUE,
    "MODEL_PREFIX": names.MODEL_PREFIX,
    "ADMITTED_PART": names.ADMITTED_PART,
    "DEADLINES_PART": names.DEADLINES_PART,
    "BAND_PART": names.BAND_PART,
    "QSEP": names.BAND_QUEUE_SEP,
    "TENANT_PREFIX": names.TENANT_PREFIX,
    "TENANT_ADMITTED_SUFFIX": names.TENANT_ADMITTED_SUFFIX,
    "JOB_PREFIX": names.job_key(""),
    "IN_PROGRESS_PREFIX": names.IN_PROGRESS_PREFIX,
    "PREFIX_PREFIX": names.PREFIX_PREFIX,
    "OUTCOME_PREFIX": names.OUTCOME_PREFIX,
    "EVENTS_PREFIX": names.EVENTS_PREFIX,
    "STORED_PREFIX": names.STORED_PREFIX,
    "LOG_PREFIX": names.LOG_PREFIX,
    "W_QUEUED": StoredStatus.QUEUED.value,
    "W_FAILED": StoredStatus.FAILED.value,
    "W_OUTCOME_TTL_MS": OUTCOME_TTL_MS,
}

# remove_waiting(id, model, band, tenant, event, outcome): the job leaves arq's queue, its
# band queue, its model's and key's places; its payload and prefix signature go; its outcome
# record is ``outcome``; a stored job still queued is failed with ``event`` in its log; its
# waiter (and a resumed stream) gets ``event``.
REMOVE_LUA = """
local function remove_waiting(id, model, band, tenant, event, outcome)
  redis.call('ZREM', MODEL_PREFIX .. model .. BAND_PART .. band .. QSEP .. tenant, id)
  redis.call('ZREM', ARQ_QUEUE, id)
  redis.call('ZREM', MODEL_PREFIX .. model .. ADMITTED_PART, id)
  redis.call('ZREM', TENANT_PREFIX .. tenant .. TENANT_ADMITTED_SUFFIX, id)
  redis.call('DEL', JOB_PREFIX .. id, PREFIX_PREFIX .. id)
  redis.call('SET', OUTCOME_PREFIX .. id, outcome, 'PX', W_OUTCOME_TTL_MS)
  local stored_id = STORED_PREFIX .. id
  if redis.call('HGET', stored_id, 'status') == W_QUEUED then
    redis.call('HSET', stored_id, 'status', W_FAILED)
    redis.call('XADD', LOG_PREFIX .. id, '*', 'e', event)
    local keep = redis.call('PTTL', stored_id)
    if keep > 0 then redis.call('PEXPIRE', LOG_PREFIX .. id, keep) end
  end
  redis.call('PUBLISH', EVENTS_PREFIX .. id, event)
end
"""

# drop_late(model, most): up to ``most`` of the model's waiting jobs whose deadline passed
# (``now``, Redis' clock) removed with LATE_EVENT; returns how many. A job claimed or
# started (its in-progress key) or gone (its payload expired) only leaves the zset.
LATE_LUA = """
local function drop_late(model, most)
  local key = MODEL_PREFIX .. model .. DEADLINES_PART
  local late = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. now, 'LIMIT', 0, most)
  local dropped = 0
  for _, member in ipairs(late) do
    redis.call('ZREM', key, member)
    local band, tenant, id = string.match(member, '^([^:]+):([^:]+):(.+)$')
    if id and redis.call('EXISTS', IN_PROGRESS_PREFIX .. id) == 0
        and redis.call('EXISTS', JOB_PREFIX .. id) == 1 then
      remove_waiting(id, model, band, tenant, late_event, late_outcome)
      dropped = dropped + 1
    end
  end
  return dropped
end
"""

# Each of ``models``: its late jobs dropped (at most SWEEP_MOST per model per call).
# Returns {model, dropped, ...} for the models that dropped any.
SWEEP_MOST = 256
SWEEP = Script(
    keys=(),
    args=("late_event", "late_outcome"),
    rest="models",
    consts={**WAITING_CONSTS, "SWEEP_MOST": SWEEP_MOST},
    clock=True,
    body=REMOVE_LUA
    + LATE_LUA
    + """
local out = {}
for _, m in ipairs(models) do
  local n = drop_late(m, SWEEP_MOST)
  if n > 0 then table.insert(out, m) table.insert(out, n) end
end
return out
""",
)


def late_args() -> dict[str, Any]:
    """The arguments every script running ``drop_late`` passes."""
    return {"late_event": LATE_EVENT, "late_outcome": p.outcome_record(p.Outcome.DEADLINE)}


def dropped_of(flat: list[Any]) -> dict[str, int]:
    """{model: dropped} from a flat {model, n, ...} reply."""
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class Deadlines:
    """The sweep (``Store.deadlines``): a worker drops its models' late jobs each beat, so
    that a job nobody waits for (a background response) ends at its deadline even while
    every slot is busy (the pick drops them too, before it takes any)."""

    def __init__(self, redis: Redis) -> None:
        self._sweep = Registered(redis, SWEEP)

    async def sweep(self, models: tuple[str, ...]) -> dict[str, int]:
        if not models:
            return {}
        return dropped_of(await self._sweep(keys={}, args=late_args(), rest=models))
