"""A job's scripts: admission, cancel, start, release, forget; a stored record's metadata."""

from __future__ import annotations

from enum import IntEnum

from llmq.shared import keys
from llmq.shared.lua import Script
from llmq.shared.protocol import StoredStatus
from llmq.shared.scripts.queue import QUEUE_CONSTS, QUEUE_LUA


class AdmitStatus(IntEnum):
    """What the admit script answers."""

    ADMITTED = 1
    FULL = 0  # the global bound (QUEUE_MODE, QUEUE_MAX)
    DUPLICATE = -1
    IDEMPOTENT = -2  # the Idempotency-Key names a job already admitted
    CONCURRENCY = 2  # the tenant's max_concurrent
    RPM = 3
    TPM = 4
    WAIT = 5  # its expected wait exceeds QUEUE_TIMEOUT_S: it would not start in time


class CancelResult(IntEnum):
    """What the cancel script answers."""

    ABORT_REQUESTED = 0  # it runs: its worker aborts it
    NEVER_RAN = 1  # it was queued and never runs
    LEFT_RUNNING = 2  # it runs and was left alone (queued_only)


_STORED = {"QUEUED": StoredStatus.QUEUED.value, "IN_PROGRESS": StoredStatus.IN_PROGRESS.value}
# arq's own job timeout is the hold + 5 s: a started job's payload outlives it.
PAYLOAD_SLACK_MS = 10_000


# The tenant's limits first (max_concurrent, rpm, tpm), then the model's bound (``admitted``
# is the model's: ``limit`` its slots + queue places); tokens leave
# the buckets only when the job is admitted. An Idempotency-Key naming an earlier job is
# answered first (IDEMPOTENT, with "<job id> <body digest>" as ``prior``): a retry
# starts nothing. Nothing is written before the decision, and the first write (a bucket
# HSET or a ZADD) is one Redis refuses when over maxmemory: it refuses a script's first write
# whole but lets later ones through, so a full Redis refuses admissions (503) with nothing
# written. Expired places are not counted, and removed after the ZADDs. A stored job's
# record (``record``: field/value pairs) is written with it and indexed for its tenant;
# its prefix signature (``prefix_hashes``, "": none) lives as long as its payload;
# index entries older than ``index_horizon_ms`` name records that are gone.
#
# The queue (``scripts.queue``): at the bound with ``displace`` "1" (queue mode), the key
# holding the most waiting jobs gives its newest waiting interactive job's place to a key
# holding fewer (at least two fewer, counting this request): that job is removed as a
# cancel removes it, and whoever waits for it gets ``displaced_event`` (429 queue_full).
# Otherwise FULL, with ``retry`` the ms until a place is expected to free (one job's end).
# Then, when the job's expected wait (its ETA) exceeds ``timeout_ms`` (0: never), WAIT: it
# would not start in time; ``retry`` the ms until it would. ``retry`` 0: unknown.
# Returns {status, N, rpm left, rpm reset ms, tpm left, tpm reset ms, retry ms, prior,
# position, ETA ms (-1: unknown), displaced job id}.
_ADMIT_BODY = """
local live = '(' .. now
local n = redis.call('ZCOUNT', admitted, live, '+inf')
local rpm_cap, tpm_cap, tokens = tonumber(rpm), tonumber(tpm), tonumber(cost)
local r_ok, r_left, r_wait, r_reset = bucket(rpm_bucket, rpm_cap, 1, false)
local t_ok, t_left, t_wait, t_reset = bucket(tpm_bucket, tpm_cap, tokens, false)
local position, eta_ms, victim = 0, -1, ''
local function answer(status, retry, prior)
  return {status, n, r_left, r_reset, t_left, t_reset, retry, prior or '', position, eta_ms,
          victim}
end
if idem_value ~= '' then
  local prior = redis.call('GET', idem)
  if prior then return answer(IDEMPOTENT, 0, prior) end
end
local maxc = tonumber(max_concurrent)
if maxc > 0 and redis.call('ZCOUNT', tenant_admitted, live, '+inf') >= maxc then
  return answer(CONCURRENCY, 0)
end
if r_ok == 0 then return answer(RPM, r_wait) end
if t_ok == 0 then return answer(TPM, t_wait) end
local service_ms = tonumber(redis.call('HGET', service, 'ms')) or 0
local cap = tonumber(capacity)
local k = redis.call('ZCARD', band_queue) + 1
local ahead, waiting, top_key, top, per_key = queue_view(bands_prefix, band, tenant, k)
if n >= tonumber(limit) then
  if displace == '1' and (per_key[tenant] or 0) + 1 < top then
    victim = displace_newest(top_key) or ''
  end
  if victim == '' then
    local running = n - waiting
    local retry = 0
    if service_ms > 0 and running > 0 then retry = math.ceil(service_ms / running) end
    return answer(FULL, retry)
  end
  n = n - 1
  waiting = waiting - 1
  if ahead > 0 then ahead = ahead - 1 end
end
position = ahead + 1
eta_ms = eta(position, waiting, n, cap, service_ms)
local timeout = tonumber(timeout_ms)
if timeout > 0 and eta_ms > timeout and victim == '' then
  return answer(WAIT, eta_ms - timeout)
end
if redis.call('EXISTS', job) == 1 then return answer(DUPLICATE, 0) end
r_ok, r_left, r_wait, r_reset = bucket(rpm_bucket, rpm_cap, 1, true)
t_ok, t_left, t_wait, t_reset = bucket(tpm_bucket, tpm_cap, tokens, true)
local deadline = now + tonumber(hold_ms)
redis.call('ZADD', admitted, deadline, job_id)
redis.call('ZADD', tenant_admitted, deadline, job_id)
redis.call('ZREMRANGEBYSCORE', admitted, '-inf', now)
redis.call('ZREMRANGEBYSCORE', tenant_admitted, '-inf', now)
redis.call('SET', job, payload, 'PX', expire_ms)
redis.call('ZADD', queue, score_ms, job_id)
redis.call('ZADD', band_queue, score_ms, job_id)
redis.call('ZADD', band_index, 'NX', 0, tenant)
if prefix_hashes ~= '' then
  redis.call('HSET', prefix, 'h', prefix_hashes)
  redis.call('PEXPIRE', prefix, expire_ms)
end
local ttl = tonumber(store_ttl_ms)
if ttl > 0 then
  redis.call('HSET', stored, unpack(record))
  redis.call('PEXPIRE', stored, ttl)
  redis.call('ZADD', stored_index, score_ms, job_id)
  local horizon = tonumber(score_ms) - tonumber(index_horizon_ms)
  redis.call('ZREMRANGEBYSCORE', stored_index, '-inf', horizon)
  if idem_value ~= '' then redis.call('SET', idem, idem_value, 'PX', ttl) end
end
redis.call('PUBLISH', wake, wake_message)
n = n + 1
return answer(ADMITTED, 0)
"""

# displace_newest(key): the newest waiting interactive job of ``key`` (lowest band first)
# removed as a never-started cancelled job is (its place, payload, queues; its stored
# record failed, with the event in its log), its waiter told ``displaced_event``.
_DISPLACE_LUA = """
local function displace_newest(key)
  for i = #BANDS, 1, -1 do
    local q = bands_prefix .. BANDS[i] .. SEP .. key
    for _, id in ipairs(redis.call('ZREVRANGE', q, 0, -1)) do
      if string.sub(id, 1, #BATCH_JOB_PREFIX) ~= BATCH_JOB_PREFIX
          and redis.call('EXISTS', IN_PROGRESS_PREFIX .. id) == 0 then
        redis.call('ZREM', q, id)
        redis.call('ZREM', queue, id)
        redis.call('ZREM', admitted, id)
        redis.call('ZREM', TENANT_PREFIX .. key .. TENANT_ADMITTED_SUFFIX, id)
        redis.call('DEL', JOB_PREFIX .. id, PREFIX_PREFIX .. id)
        redis.call('SET', OUTCOME_PREFIX .. id, displaced_outcome, 'PX', outcome_ttl_ms)
        local stored_id = STORED_PREFIX .. id
        if redis.call('HGET', stored_id, 'status') == QUEUED then
          redis.call('HSET', stored_id, 'status', FAILED)
          redis.call('XADD', LOG_PREFIX .. id, '*', 'e', displaced_event)
          local keep = redis.call('PTTL', stored_id)
          if keep > 0 then redis.call('PEXPIRE', LOG_PREFIX .. id, keep) end
        end
        redis.call('PUBLISH', EVENTS_PREFIX .. id, displaced_event)
        return id
      end
    end
  end
  return nil
end
"""

ADMIT = Script(
    keys=("admitted", "queue", "job", "tenant_admitted", "rpm_bucket", "tpm_bucket",
          "band_index", "band_queue", "stored", "idem", "stored_index", "service", "prefix"),
    args=("limit", "hold_ms", "payload", "expire_ms", "job_id", "score_ms", "wake",
          "wake_message", "tenant", "max_concurrent", "rpm", "tpm", "cost", "store_ttl_ms",
          "idem_value", "index_horizon_ms", "capacity", "timeout_ms", "bands_prefix", "band",
          "displace", "displaced_event", "displaced_outcome", "outcome_ttl_ms", "prefix_hashes"),
    rest="record",
    consts={**{s.name: s.value for s in AdmitStatus}, **QUEUE_CONSTS, **_STORED,
            "FAILED": StoredStatus.FAILED.value, "JOB_PREFIX": keys.job_key(""),
            "IN_PROGRESS_PREFIX": keys.IN_PROGRESS_PREFIX, "TENANT_PREFIX": keys.TENANT_PREFIX,
            "TENANT_ADMITTED_SUFFIX": keys.TENANT_ADMITTED_SUFFIX,
            "OUTCOME_PREFIX": keys.OUTCOME_PREFIX, "EVENTS_PREFIX": keys.EVENTS_PREFIX,
            "STORED_PREFIX": keys.STORED_PREFIX, "LOG_PREFIX": keys.LOG_PREFIX,
            "PREFIX_PREFIX": keys.PREFIX_PREFIX},
    bucket=True,
    body=QUEUE_LUA + _DISPLACE_LUA + _ADMIT_BODY,
)  # fmt: skip

# Not started: removed everywhere, it never runs; whoever follows its events (a resumed
# stream) gets ``error_event``, and a stored job's record and log say so. Running: arq's
# abort requested (its worker ends it), or left alone when ``queued_only`` is "1".
CANCEL = Script(
    keys=("admitted", "queue", "job", "in_progress", "abort", "tenant_admitted", "band_queue",
          "outcome", "stored", "log", "prefix"),
    args=("job_id", "now_ms", "wake", "outcome_record", "outcome_ttl_ms", "events",
          "error_event", "new_status", "store_ttl_ms", "queued_only"),
    consts={**{r.name: r.value for r in CancelResult}, **_STORED},
    body="""
if redis.call('EXISTS', in_progress) == 0 then
  redis.call('DEL', job, prefix)
  redis.call('ZREM', queue, job_id)
  redis.call('ZREM', admitted, job_id)
  redis.call('ZREM', tenant_admitted, job_id)
  redis.call('ZREM', band_queue, job_id)
  redis.call('SET', outcome, outcome_record, 'PX', outcome_ttl_ms)
  local status = redis.call('HGET', stored, 'status')
  if status == QUEUED then
    redis.call('HSET', stored, 'status', new_status)
    redis.call('XADD', log, '*', 'e', error_event)
    redis.call('PEXPIRE', stored, store_ttl_ms)
    redis.call('PEXPIRE', log, store_ttl_ms)
  end
  if status == false or status == QUEUED then redis.call('PUBLISH', events, error_event) end
  return NEVER_RAN
end
if queued_only == '1' then return LEFT_RUNNING end
redis.call('ZADD', abort, now_ms, job_id)
redis.call('PUBLISH', wake, job_id)
return ABORT_REQUESTED
""",
)  # fmt: skip

# A job starts: its deadlines re-armed (self-healing N), which worker runs it, for whom and
# for which model (what the reaper needs if the worker dies); a stored job is in progress.
# Its payload, which expired QUEUE_TIMEOUT_S after the enqueue (a job that never starts never
# runs), now lives
# as long as the job may run (arq deletes it when the job ends): what operators read
# (llmq-jobs show, GET arq:job:<id>) is there while it runs. A longer expiry (a batch
# request's window) is kept.
START = Script(
    keys=("admitted", "tenant_admitted", "worker_jobs", "stored", "job", "claims"),
    args=("job_id", "hold_ms", "tenant", "model"),
    consts={**_STORED, "PAYLOAD_SLACK_MS": PAYLOAD_SLACK_MS},
    clock=True,
    body="""
if redis.call('HGET', stored, 'status') == QUEUED then
  redis.call('HSET', stored, 'status', IN_PROGRESS)
end
local keep = tonumber(hold_ms) + PAYLOAD_SLACK_MS
local ttl = redis.call('PTTL', job)
if ttl >= 0 and ttl < keep then redis.call('PEXPIRE', job, keep) end
local deadline = now + tonumber(hold_ms)
redis.call('HSET', worker_jobs, job_id, cjson.encode({tenant, model}))
redis.call('HDEL', claims, job_id)
redis.call('ZADD', tenant_admitted, 'XX', deadline, job_id)
return redis.call('ZADD', admitted, 'XX', deadline, job_id)
""",
)

# A job ended, whatever the outcome: its places go, its model's ``done`` counter (the drain
# rate the scaling signal reads) counts it, the tenant's token bucket is corrected
# with the exact usage (``extra``: tokens used beyond the admission estimate, may be
# negative); a stored job's record and log are kept STORE_TTL_S from now (``stored_status``
# "": not stored). A completed job's run time (``run_ms``, -1: not measured) updates the
# model's service time (EWMA, weight SERVICE_ALPHA), which ETAs and Retry-After are made of.
RELEASE = Script(
    keys=("admitted", "tenant_admitted", "worker_jobs", "tpm_bucket", "outcome", "stored", "log",
          "done", "claims", "service"),
    args=("job_id", "extra", "tpm", "outcome_record", "outcome_ttl_ms", "stored_status",
          "store_ttl_ms", "run_ms"),
    consts={"SERVICE_ALPHA": "0.2"},
    bucket=True,
    body="""
if stored_status ~= '' and redis.call('EXISTS', stored) == 1 then
  redis.call('HSET', stored, 'status', stored_status)
  redis.call('PEXPIRE', stored, store_ttl_ms)
  redis.call('PEXPIRE', log, store_ttl_ms)
end
redis.call('HDEL', worker_jobs, job_id)
redis.call('HDEL', claims, job_id)
redis.call('ZREM', tenant_admitted, job_id)
redis.call('SET', outcome, outcome_record, 'PX', outcome_ttl_ms)
redis.call('INCR', done)
local run = tonumber(run_ms)
if run >= 0 then
  local old = tonumber(redis.call('HGET', service, 'ms'))
  local ms = run
  if old then ms = old + tonumber(SERVICE_ALPHA) * (run - old) end
  redis.call('HSET', service, 'ms', math.floor(ms + 0.5))
  redis.call('HINCRBY', service, 'n', 1)
end
local cap, used = tonumber(tpm), tonumber(extra)
if cap > 0 and used ~= 0 then
  redis.call('HSET', tpm_bucket, 't', math.min(cap, refilled(tpm_bucket, cap) - used), 'ts', now)
  redis.call('PEXPIRE', tpm_bucket, BUCKET_TTL_MS)
end
return redis.call('ZREM', admitted, job_id)
""",
)  # fmt: skip

# A job that ended while Redis was unreachable: every trace arq and the worker could not
# remove; its client, who may be waiting (on a new primary after a failover, its events
# lost with the old one), is told (``error_event``, out of band).
FORGET = Script(
    keys=(
        "admitted",
        "tenant_admitted",
        "worker_jobs",
        "queue",
        "job",
        "in_progress",
        "outcome",
        "claims",
    ),
    args=("job_id", "outcome_record", "outcome_ttl_ms", "events", "error_event"),
    body="""
redis.call('PUBLISH', events, error_event)
redis.call('HDEL', claims, job_id)
redis.call('ZREM', admitted, job_id)
redis.call('ZREM', tenant_admitted, job_id)
redis.call('HDEL', worker_jobs, job_id)
redis.call('ZREM', queue, job_id)
redis.call('SET', outcome, outcome_record, 'PX', outcome_ttl_ms)
return redis.call('DEL', job, in_progress)
""",
)

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
