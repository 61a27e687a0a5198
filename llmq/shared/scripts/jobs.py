"""A job's scripts: admission, cancel, start, release, forget; a stored record's metadata."""

from __future__ import annotations

from enum import IntEnum

from llmq.shared.lua import Script
from llmq.shared.protocol import StoredStatus


class AdmitStatus(IntEnum):
    """What the admit script answers."""

    ADMITTED = 1
    FULL = 0  # the global bound (QUEUE_MODE, QUEUE_MAX)
    DUPLICATE = -1
    IDEMPOTENT = -2  # the Idempotency-Key names a job already admitted
    CONCURRENCY = 2  # the tenant's max_concurrent
    RPM = 3
    TPM = 4


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
# answered first (IDEMPOTENT, with "<job id> <body digest>" as an 8th element): a retry
# starts nothing. Nothing is written before the decision, and the first write (a bucket
# HSET or a ZADD) is one Redis refuses when over maxmemory: it refuses a script's first write
# whole but lets later ones through, so a full Redis refuses admissions (503) with nothing
# written. Expired places are not counted, and removed after the ZADDs. A stored job's
# record (``record``: field/value pairs) is written with it and indexed for its tenant;
# index entries older than ``index_horizon_ms`` name records that are gone.
# Returns {status, N, rpm left, rpm reset ms, tpm left, tpm reset ms, retry ms}.
ADMIT = Script(
    keys=("admitted", "queue", "job", "tenant_admitted", "rpm_bucket", "tpm_bucket",
          "band_index", "band_queue", "stored", "idem", "stored_index"),
    args=("limit", "hold_ms", "payload", "expire_ms", "job_id", "score_ms", "wake",
          "wake_message", "tenant", "max_concurrent", "rpm", "tpm", "cost", "store_ttl_ms",
          "idem_value", "index_horizon_ms"),
    rest="record",
    consts={s.name: s.value for s in AdmitStatus},
    bucket=True,
    body="""
local live = '(' .. now
local n = redis.call('ZCOUNT', admitted, live, '+inf')
local rpm_cap, tpm_cap, tokens = tonumber(rpm), tonumber(tpm), tonumber(cost)
local r_ok, r_left, r_wait, r_reset = bucket(rpm_bucket, rpm_cap, 1, false)
local t_ok, t_left, t_wait, t_reset = bucket(tpm_bucket, tpm_cap, tokens, false)
local function answer(status, retry)
  return {status, n, r_left, r_reset, t_left, t_reset, retry}
end
if idem_value ~= '' then
  local prior = redis.call('GET', idem)
  if prior then
    local a = answer(IDEMPOTENT, 0)
    table.insert(a, prior)
    return a
  end
end
local maxc = tonumber(max_concurrent)
if maxc > 0 and redis.call('ZCOUNT', tenant_admitted, live, '+inf') >= maxc then
  return answer(CONCURRENCY, 0)
end
if r_ok == 0 then return answer(RPM, r_wait) end
if t_ok == 0 then return answer(TPM, t_wait) end
if n >= tonumber(limit) then return answer(FULL, 0) end
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
""",
)  # fmt: skip

# Not started: removed everywhere, it never runs; whoever follows its events (a resumed
# stream) gets ``error_event``, and a stored job's record and log say so. Running: arq's
# abort requested (its worker ends it), or left alone when ``queued_only`` is "1".
CANCEL = Script(
    keys=("admitted", "queue", "job", "in_progress", "abort", "tenant_admitted", "band_queue",
          "outcome", "stored", "log"),
    args=("job_id", "now_ms", "wake", "outcome_record", "outcome_ttl_ms", "events",
          "error_event", "new_status", "store_ttl_ms", "queued_only"),
    consts={**{r.name: r.value for r in CancelResult}, **_STORED},
    body="""
if redis.call('EXISTS', in_progress) == 0 then
  redis.call('DEL', job)
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
# "": not stored).
RELEASE = Script(
    keys=("admitted", "tenant_admitted", "worker_jobs", "tpm_bucket", "outcome", "stored", "log",
          "done", "claims"),
    args=("job_id", "extra", "tpm", "outcome_record", "outcome_ttl_ms", "stored_status",
          "store_ttl_ms"),
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
