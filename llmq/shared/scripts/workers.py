"""The workers' scripts: heartbeat, the reaper of dead workers, and the readings of the
queue (the pick is ``scripts.pick``'s)."""

from __future__ import annotations

from llmq.shared import keys
from llmq.shared.lua import Script
from llmq.shared.protocol import BANDS, StoredStatus

# Workers whose heartbeat expired are dead (their records of cached prefixes go with them):
# each job they had started loses its places,
# queue entry, in-progress marker and payload (it never runs again: at most once), gets the
# outcome record ``outcome_record``, and its client is told (``error_event``, out of band;
# logged too for a stored job, whose status becomes failed). A batch request's error line is
# ``failure_line`` (batch_records.failure_line's, rendered in Python) with its id and
# custom_id (read from arq's payload) filled in, counted as failed, never run again.
# Idempotent; any process may run it. Returns {dead worker ids..., reaped job count}.
REAP = Script(
    keys=("workers", "queue"),
    args=("model_prefix", "worker_prefix", "worker_jobs_prefix", "worker_claims_prefix",
          "job_prefix", "in_progress_prefix",
          "events_prefix", "error_event", "tenant_prefix", "outcome_prefix", "outcome_record",
          "outcome_ttl_ms", "stored_prefix", "log_prefix", "store_ttl_ms", "batch_job_prefix",
          "batch_prefix", "failure_line", "worker_prefixes_prefix"),
    consts={
        "TENANT_ADMITTED": keys.TENANT_ADMITTED_SUFFIX,
        "MODEL_ADMITTED": keys.ADMITTED_PART,
        "INFLIGHT": ":" + keys.BATCH_INFLIGHT,
        "ERR": ":" + keys.BATCH_ERR,
        "FAILED": StoredStatus.FAILED.value,
        "LINE_ID": '"@@ID@@"',
        "LINE_CUSTOM_ID": '"@@CUSTOM_ID@@"',
    },
    clock=True,
    body="""
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
local jobs = 0
for _, w in ipairs(dead) do
  local records = worker_jobs_prefix .. w
  local pairs_ = redis.call('HGETALL', records)
  for _, x in ipairs(redis.call('HGETALL', worker_claims_prefix .. w)) do
    table.insert(pairs_, x)  -- picked, maybe started: ended like started ones (at most once)
  end
  for i = 1, #pairs_, 2 do
    local id, tenant, model = pairs_[i], pairs_[i + 1], nil
    local ok, v = pcall(cjson.decode, tenant)  -- [tenant, model]
    if ok and type(v) == 'table' then tenant, model = v[1], v[2] end
    if model then redis.call('ZREM', model_prefix .. model .. MODEL_ADMITTED, id) end
    redis.call('ZREM', tenant_prefix .. tenant .. TENANT_ADMITTED, id)
    redis.call('ZREM', queue, id)
    local bid, index = string.match(id, '^' .. batch_job_prefix .. '(.+)_(%d+)$')
    if bid and redis.call('SREM', batch_prefix .. bid .. INFLIGHT, id) == 1 then
      batch_line(id, bid, index)
    end
    redis.call('DEL', job_prefix .. id, in_progress_prefix .. id)
    redis.call('SET', outcome_prefix .. id, outcome_record, 'PX', outcome_ttl_ms)
    redis.call('PUBLISH', events_prefix .. id, error_event)
    if redis.call('EXISTS', stored_prefix .. id) == 1 then
      redis.call('HSET', stored_prefix .. id, 'status', FAILED)
      redis.call('XADD', log_prefix .. id, '*', 'e', error_event)
      redis.call('PEXPIRE', stored_prefix .. id, store_ttl_ms)
      redis.call('PEXPIRE', log_prefix .. id, store_ttl_ms)
    end
    jobs = jobs + 1
  end
  redis.call('DEL', records, worker_claims_prefix .. w, worker_prefix .. w,
             worker_prefixes_prefix .. w)
  redis.call('ZREM', workers, w)
end
table.insert(dead, jobs)
return dead
""",
)  # fmt: skip

# A worker's claims older than ``min_age_ms`` whose job it is not running (``running``: the
# ids it holds) never started: a pick whose reply was lost (Redis failed over or dropped
# the connection after running the script). Each goes back to its tenant's queue in its
# band, under its enqueue score, and its model's workers are woken; a claim whose job
# ended or expired is dropped. Returns the number requeued.
REQUEUE = Script(
    keys=("claims", "queue"),
    args=("job_prefix", "in_progress_prefix", "model_prefix", "wake", "min_age_ms"),
    rest="running",
    consts={"SEP": keys.BAND_QUEUE_SEP, "BAND_PART": keys.BAND_PART, "WAKE_MODEL": keys.WAKE_MODEL},
    clock=True,
    body="""
local skip = {}
for _, id in ipairs(running) do skip[id] = true end
local flat = redis.call('HGETALL', claims)
local n = 0
for i = 1, #flat, 2 do
  local id = flat[i]
  local c = cjson.decode(flat[i + 1])  -- {tenant, model, band, score, claimed ms}
  if not skip[id] and now - tonumber(c[5]) >= tonumber(min_age_ms) then
    redis.call('HDEL', claims, id)
    if redis.call('EXISTS', job_prefix .. id) == 1 and redis.call('ZSCORE', queue, id) then
      local index = model_prefix .. c[2] .. BAND_PART .. c[3]
      redis.call('DEL', in_progress_prefix .. id)
      redis.call('ZADD', index .. SEP .. c[1], c[4], id)
      redis.call('ZADD', index, 'NX', 0, c[1])
      redis.call('PUBLISH', wake, WAKE_MODEL .. c[2])
      n = n + 1
    end
  end
end
return n
""",
)

# Waiting jobs per model and band: for each of ``models``, as many numbers as BANDS.
DEPTH = Script(
    keys=(),
    args=("model_prefix",),
    rest="models",
    consts={"SEP": keys.BAND_QUEUE_SEP, "BAND_PART": keys.BAND_PART, "BANDS": BANDS},
    body="""
local out = {}
for _, m in ipairs(models) do
  for _, band in ipairs(BANDS) do
    local index = model_prefix .. m .. BAND_PART .. band
    local waiting = 0
    for _, tenant in ipairs(redis.call('ZRANGE', index, 0, -1)) do
      waiting = waiting + redis.call('ZCARD', index .. SEP .. tenant)
    end
    table.insert(out, waiting)
  end
end
return out
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

# Hashes of live workers (expired ones are left in the index for the reaper, which needs
# them to find their jobs).
LIVE_WORKERS = Script(
    keys=("workers",),
    args=("worker_prefix",),
    clock=True,
    body="""
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', workers, now, '+inf')) do
  local h = redis.call('HGETALL', worker_prefix .. id)
  if #h > 0 then table.insert(out, h) end
end
return out
""",
)

# Jobs in the queue that are not running (the first ``scan_limit`` looked at).
QUEUE_DEPTH = Script(
    keys=("queue",),
    args=("in_progress_prefix", "scan_limit"),
    body="""
local ids = redis.call('ZRANGE', queue, 0, tonumber(scan_limit) - 1)
local waiting = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', in_progress_prefix .. id) == 0 then waiting = waiting + 1 end
end
return waiting
""",
)
