"""A job's life in Redis: admitted and enqueued (``admit``), cancelled, started, released,
forgotten after an outage, and its events published; each step one Lua script, defined here.

``Jobs`` is ``Store.jobs``. The wait a job is told at admission (position, ETA, predictive
refusal, a fair share of places) is the Lua of ``queue.standing``, which the position
reading (``queue.readings``) shares. Keys come from ``queue.names``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llmq.shared import protocol as p
from llmq.shared.errors import JobCancelled, QueueFull, QueueUnavailable, ServiceError
from llmq.shared.protocol import OUTCOME_TTL_MS, StoredStatus
from llmq.shared.queue import names
from llmq.shared.queue.failover import not_replicated
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.queue.standing import QUEUE_CONSTS, QUEUE_LUA
from llmq.shared.queue.waiting import REMOVE_LUA, WAITING_CONSTS, out_of_band
from llmq.shared.sealing import Sealer


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
    DEADLINE = 6  # its predicted time to first token exceeds its objective


class CancelResult(IntEnum):
    """What the cancel script answers."""

    ABORT_REQUESTED = 0  # it runs: its worker aborts it
    NEVER_RAN = 1  # it was queued and never runs
    LEFT_RUNNING = 2  # it runs and was left alone (queued_only)


_STORED = {"QUEUED": StoredStatus.QUEUED.value, "IN_PROGRESS": StoredStatus.IN_PROGRESS.value}


# arq's own job timeout is the hold + 5 s: a started job's payload outlives it.
PAYLOAD_SLACK_MS = 10_000

# A model's measured time to first token older than this is not used to refuse: after a
# spell of refusals nothing measures it again, so it must not refuse forever.
TTFT_FRESH_MS = 30_000


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
# The queue (``queue.standing``): at the bound with ``displace`` "1" (queue mode), the key
# holding the most waiting jobs gives its newest waiting interactive job's place to a key
# holding fewer (at least two fewer, counting this request): that job is removed as a
# cancel removes it, and whoever waits for it gets ``displaced_event`` (429 queue_full).
# Otherwise FULL, with ``retry`` the ms until a place is expected to free (one job's end).
# The job is due at now + ``objective_ms`` (its time-to-first-token objective), or now +
# ``default_due_ms`` (QUEUE_TIMEOUT_S) without one: its key's waiting jobs in the band are
# ordered by that (earliest deadline first), so its position counts those due before it.
# With an objective (and ``best_effort`` not "1"), DEADLINE when its ETA plus the model's
# measured time to first token (younger than TTFT_FRESH_MS; else 0) exceeds it, ``retry``
# the ms until it would not; when admitted, it joins the model's deadlines (dropped there
# if it has not started by then: ``queue.waiting``).
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
local svc = redis.call('HMGET', service, 'ms', 'ttft', 'ttft_at')
local service_ms = tonumber(svc[1]) or 0
local cap = tonumber(capacity)
local objective = tonumber(objective_ms)
local due = now + tonumber(default_due_ms)
if objective > 0 then due = now + objective end
local k = redis.call('ZCOUNT', band_queue, '-inf', due) + 1
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
if objective > 0 and best_effort ~= '1' and eta_ms >= 0 and victim == '' then
  local ttft = 0
  if svc[2] and now - (tonumber(svc[3]) or 0) < TTFT_FRESH_MS then ttft = tonumber(svc[2]) end
  if eta_ms + ttft > objective then return answer(DEADLINE, eta_ms + ttft - objective) end
end
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
redis.call('ZADD', band_queue, due, job_id)
redis.call('ZADD', band_index, 'NX', 0, tenant)
if objective > 0 and best_effort ~= '1' then
  redis.call('ZADD', MODEL_PREFIX .. model .. DEADLINES_PART, due,
             band .. QSEP .. tenant .. QSEP .. job_id)
end
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


# displace_newest(key): the newest waiting interactive job of ``key`` (lowest band first;
# its latest deadline first within a band) removed as a never-started cancelled job is
# (``queue.waiting``), its waiter told ``displaced_event``.
_DISPLACE_LUA = """
local function displace_newest(key)
  for i = #BANDS, 1, -1 do
    local q = bands_prefix .. BANDS[i] .. SEP .. key
    for _, id in ipairs(redis.call('ZREVRANGE', q, 0, -1)) do
      if string.sub(id, 1, #BATCH_JOB_PREFIX) ~= BATCH_JOB_PREFIX
          and redis.call('EXISTS', IN_PROGRESS_PREFIX .. id) == 0 then
        remove_waiting(id, model, BANDS[i], key, displaced_event, displaced_outcome)
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
          "displace", "displaced_event", "displaced_outcome", "outcome_ttl_ms", "prefix_hashes",
          "model", "objective_ms", "best_effort", "default_due_ms"),
    rest="record",
    consts={**{s.name: s.value for s in AdmitStatus}, **QUEUE_CONSTS, **WAITING_CONSTS,
            "TTFT_FRESH_MS": TTFT_FRESH_MS},
    bucket=True,
    body=QUEUE_LUA + REMOVE_LUA + _DISPLACE_LUA + _ADMIT_BODY,
)  # fmt: skip


# A job leaves arq's queue and its model's and key's places, with its outcome record: what
# CANCEL (a job that never ran) and FORGET (one that ended while Redis was away) both do.
_FREE_PLACES = """
local function free_places()
  redis.call('ZREM', queue, job_id)
  redis.call('ZREM', admitted, job_id)
  redis.call('ZREM', tenant_admitted, job_id)
  redis.call('SET', outcome, outcome_record, 'PX', outcome_ttl_ms)
end
"""

# Not started (or migrated and waiting to be resumed): removed everywhere, it never runs
# (again); whoever follows its events (a resumed stream) gets ``error_event``, and a stored
# job's record and log say so (another job's progress log goes). Running: arq's
# abort requested (its worker ends it), or left alone when ``queued_only`` is "1".
CANCEL = Script(
    keys=("admitted", "queue", "job", "in_progress", "abort", "tenant_admitted", "band_queue",
          "outcome", "stored", "log", "prefix", "moves"),
    args=("job_id", "now_ms", "wake", "outcome_record", "outcome_ttl_ms", "events",
          "error_event", "new_status", "store_ttl_ms", "queued_only"),
    consts={**{r.name: r.value for r in CancelResult}, **_STORED},
    body=_FREE_PLACES + """
if redis.call('EXISTS', in_progress) == 0 then
  redis.call('DEL', job, prefix, moves)
  free_places()
  redis.call('ZREM', band_queue, job_id)
  local status = redis.call('HGET', stored, 'status')
  if status == false then redis.call('DEL', log) end
  if status == IN_PROGRESS then status = QUEUED end  -- migrated: waits to be resumed
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


# A job starts: its deadlines re-armed (self-healing N), which worker runs it, for whom, for
# which model and in which band (what the reaper needs if the worker dies: to end the job or
# hand it over); a stored job is in progress.
# Its payload, which expired QUEUE_TIMEOUT_S after the enqueue (a job that never starts never
# runs), now lives
# as long as the job may run (arq deletes it when the job ends): what operators read
# (llmq-jobs show, GET arq:job:<id>) is there while it runs. A longer expiry (a batch
# request's window) is kept. A job with a deadline leaves the model's deadlines
# (``deadline_member``, "": none): it started in time.
START = Script(
    keys=("admitted", "tenant_admitted", "worker_jobs", "stored", "job", "claims", "deadlines"),
    args=("job_id", "hold_ms", "tenant", "model", "deadline_member", "band"),
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
redis.call('HSET', worker_jobs, job_id, cjson.encode({tenant, model, band}))
redis.call('HDEL', claims, job_id)
if deadline_member ~= '' then redis.call('ZREM', deadlines, deadline_member) end
redis.call('ZADD', tenant_admitted, 'XX', deadline, job_id)
return redis.call('ZADD', admitted, 'XX', deadline, job_id)
""",
)


# A job ended, whatever the outcome: its places go, its model's ``done`` counter (the drain
# rate the scaling signal reads) counts it, its migrations record and (not stored) its
# progress log go, the tenant's token bucket is corrected
# with the exact usage (``extra``: tokens used beyond the admission estimate, may be
# negative); a stored job's record and log are kept STORE_TTL_S from now (``stored_status``
# "": not stored). A completed job's run time (``run_ms``, -1: not measured) updates the
# model's service time (EWMA, weight SERVICE_ALPHA), which ETAs and Retry-After are made of;
# its engine's time to first token (``ttft_ms``, -1: not measured) the model's (``ttft``,
# the same EWMA, with ``ttft_at``: when), what a deadline's prediction adds to the ETA.
RELEASE = Script(
    keys=("admitted", "tenant_admitted", "worker_jobs", "tpm_bucket", "outcome", "stored", "log",
          "done", "claims", "service", "moves"),
    args=("job_id", "extra", "tpm", "outcome_record", "outcome_ttl_ms", "stored_status",
          "store_ttl_ms", "run_ms", "ttft_ms"),
    consts={"SERVICE_ALPHA": "0.2"},
    bucket=True,
    body="""
if stored_status ~= '' and redis.call('EXISTS', stored) == 1 then
  redis.call('HSET', stored, 'status', stored_status)
  redis.call('PEXPIRE', stored, store_ttl_ms)
  redis.call('PEXPIRE', log, store_ttl_ms)
elseif stored_status == '' then
  redis.call('DEL', log)  -- a job not stored: its progress (MIGRATE) goes with it
end
redis.call('DEL', moves)
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
local first = tonumber(ttft_ms)
if first >= 0 then
  local old = tonumber(redis.call('HGET', service, 'ttft'))
  local ms = first
  if old then ms = old + tonumber(SERVICE_ALPHA) * (first - old) end
  redis.call('HSET', service, 'ttft', math.floor(ms + 0.5), 'ttft_at', now)
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
    body=_FREE_PLACES
    + """
redis.call('PUBLISH', events, error_event)
redis.call('HDEL', claims, job_id)
redis.call('HDEL', worker_jobs, job_id)
free_places()
return redis.call('DEL', job, in_progress)
""",
)


# What a job displaced from a full queue (a fair share: ``queue.standing``) is told.
_DISPLACED_EVENT = out_of_band(
    QueueFull(
        "the queue is full and your API key held the most places in it: this request gave "
        "its place to another key's; retry later",
        retry_after_s=1,
    )
)
_LOST_TRACK = QueueUnavailable("the job ended while its worker could not reach Redis; retry")


Logged = dict[str, list[tuple[int, bytes]]]  # job id -> (seq, encoded event), to log


def _flat(fields: dict[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


# A stored record lives at most its wait and run (each bounded by a day in Settings) plus
# STORE_TTL_S: index entries older than that name records that are gone.
_STORED_INDEX_SLACK_MS = 2 * 86_400_000


def _record_fields(record: p.StoredJob | None, messages: str) -> dict[str, str]:
    if record is None:
        return {}
    fields = record.to_hash()
    if messages:
        fields[names.STORED_MESSAGES] = messages
    return fields


@dataclass(frozen=True, slots=True)
class AdmitResult:
    status: AdmitStatus
    in_system: int  # N after the attempt: admitted jobs not yet finished
    rpm_left: int = -1  # -1: no such limit
    rpm_reset_ms: int = 0  # until the bucket is full again
    tpm_left: int = -1
    tpm_reset_ms: int = 0
    retry_after_ms: int = 0  # RPM / TPM / FULL / WAIT: when it would fit (0: unknown)
    prior: str = ""  # IDEMPOTENT: the key's value, "<job id> <body digest>"
    position: int = 0  # ADMITTED: its place in line (1: next), 0: not computed
    eta_ms: int = -1  # ADMITTED: ms until it is expected to start (-1: unknown); WAIT: its ETA
    displaced: str = ""  # ADMITTED: the job whose place it took (a fair share), if any

    @property
    def admitted(self) -> bool:
        return self.status == AdmitStatus.ADMITTED


@dataclass(frozen=True, slots=True)
class QueueTerms:
    """What the admit script weighs besides the bound (``queue.standing``)."""

    capacity: int = 0  # the model's slots (0: no ETA)
    timeout_s: float = 0.0  # refuse (WAIT) a job expected to wait longer; 0: never
    displace: bool = False  # at the bound, the most-queued key gives a place to a lesser one
    # When a job without an objective is due (QUEUE_TIMEOUT_S): its key's jobs are ordered
    # by deadline, and this is its own.
    due_s: float = 30.0


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What the admit script checks for the job's tenant (0: unlimited)."""

    max_concurrent: int = 0
    rpm: int = 0


class Jobs:
    """A job's life (``Store.jobs``): the scripts of this module, loaded into one client."""

    def __init__(
        self,
        redis: Redis,
        sealer: Sealer,
        store_ttl_s: float = 3600.0,
        replicas_ack: int = 0,
        wait_timeout_s: float = 1.0,
    ) -> None:
        """``replicas_ack``: REDIS_MIN_REPLICAS_ACK, the replicas an admission waits for
        (WAIT, up to ``wait_timeout_s``). ``sealer``: PAYLOAD_KEYS (none: payloads plain)."""
        self.redis = redis
        self.sealer = sealer
        self.store_ttl_ms = int(store_ttl_s * 1000)  # STORE_TTL_S
        self.replicas_ack, self.wait_timeout_s = replicas_ack, wait_timeout_s
        self._admit = Registered(redis, ADMIT)
        self._cancel = Registered(redis, CANCEL)
        self._start = Registered(redis, START)
        self._release = Registered(redis, RELEASE)
        self._forget = Registered(redis, FORGET)

    # -- gateway side ------------------------------------------------------------------
    async def admit(
        self,
        spec: p.JobSpec,
        *,
        limit: int,
        hold_s: float,
        expire_s: float,
        tenant: TenantLimits | None = None,
        record: p.StoredJob | None = None,
        messages: str = "",
        idempotency: tuple[str, str] | None = None,
        queue: QueueTerms | None = None,
        prefix: tuple[str, ...] = (),
    ) -> AdmitResult:
        """Admit and enqueue in one atomic step: nothing is ever half-enqueued.

        Checks the tenant's limits (``tenant``, and ``spec.tpm`` with ``spec.token_estimate``)
        and then the global ``limit``. ``hold_s`` bounds how long the job may hold its place
        before it starts (then the worker re-arms it); ``expire_s`` is the arq job key's
        expiry (QUEUE_TIMEOUT_S). The job joins its tenant's queue in its band.
        ``record``: a stored job's record, written with it (and indexed for its tenant's
        listing); ``messages``: the request's messages as JSON, kept in the record when the
        client asked for it (``store: true``). ``idempotency``: (key digest,
        body digest) of an Idempotency-Key: when the key names an earlier job, nothing is
        admitted and the answer is IDEMPOTENT with that job (``prior``). ``queue``: the
        model's slots, the wait a job may not exceed (WAIT beyond it) and whether a full
        queue gives a place to a key holding fewer (``queue.standing``). ``prefix``: the
        job's prefix signature (``shared.prefix``), for cache-aware pickup.
        """
        t = tenant or TenantLimits()
        q = queue or QueueTerms()
        payload = serialize_job(
            p.JOB_FUNCTION,
            (self.sealer.seal_spec(spec).model_dump(mode="json"),),
            {},
            1,
            spec.enqueued_at_ms,
            serializer=p.json_dumps,
        )
        call: dict[str, Any] = dict(
            keys={
                "admitted": names.model_admitted_key(spec.model),
                "queue": names.QUEUE,
                "job": names.job_key(spec.id),
                "tenant_admitted": names.tenant_admitted_key(spec.tenant),
                "rpm_bucket": names.tenant_rpm_key(spec.tenant),
                "tpm_bucket": names.tenant_tpm_key(spec.tenant),
                "band_index": names.band_key(spec.model, spec.band),
                "band_queue": names.band_queue_key(spec.model, spec.band, spec.tenant),
                "stored": names.stored_key(spec.id),
                "idem": names.idem_key(spec.tenant, idempotency[0] if idempotency else ""),
                "stored_index": names.tenant_stored_key(spec.tenant),
                "service": names.model_service_key(spec.model),
                "prefix": names.prefix_key(spec.id),
            },
            args={
                "limit": limit,
                "hold_ms": int(hold_s * 1000),
                "payload": payload,
                "expire_ms": max(1, int(expire_s * 1000)),
                "job_id": spec.id,
                "score_ms": spec.enqueued_at_ms,
                "wake": names.WAKE_CHANNEL,
                "wake_message": names.wake_for(spec.model),
                "tenant": spec.tenant,
                "max_concurrent": t.max_concurrent,
                "rpm": t.rpm,
                "tpm": spec.tpm,
                "cost": spec.token_estimate,
                "store_ttl_ms": self.store_ttl_ms if record else 0,
                "idem_value": f"{spec.id} {idempotency[1]}" if idempotency else "",
                "index_horizon_ms": self.store_ttl_ms + _STORED_INDEX_SLACK_MS,
                "capacity": q.capacity,
                "timeout_ms": int(q.timeout_s * 1000),
                "bands_prefix": names.model_bands_prefix(spec.model),
                "band": spec.band.value,
                "displace": "1" if q.displace else "0",
                "displaced_event": _DISPLACED_EVENT,
                "displaced_outcome": p.outcome_record(p.Outcome.DISPLACED),
                "outcome_ttl_ms": OUTCOME_TTL_MS,
                "prefix_hashes": " ".join(prefix),
                "model": spec.model,
                "objective_ms": spec.ttft_objective_ms,
                "best_effort": "1" if spec.best_effort else "0",
                "default_due_ms": int(q.due_s * 1000),
            },
            rest=_flat(
                _record_fields(record, self.sealer.seal_text(messages, f"messages:{spec.id}"))
            ),
        )
        acked = self.replicas_ack
        try:
            if self.replicas_ack:  # WAIT on the script's own connection: one round trip
                async with self.redis.pipeline(transaction=False) as pipe:
                    await self._admit(**call, client=pipe)
                    pipe.wait(self.replicas_ack, max(1, int(self.wait_timeout_s * 1000)))
                    out, acked = await pipe.execute()
            else:
                out = await self._admit(**call)
        except RedisError:
            # The script may have run (its reply lost): a job admitted for a client that is
            # told 503 would take a slot for nobody. Taken back if Redis still answers.
            with contextlib.suppress(RedisError):
                await self.cancel(spec, QueueUnavailable("its admission was not confirmed"))
            raise
        prior, displaced = out[7].decode(), out[10].decode()
        n, rpm_left, rpm_reset, tpm_left, tpm_reset, retry = (int(v) for v in out[1:7])
        position, eta_ms = int(out[8]), int(out[9])
        status = AdmitStatus(int(out[0]))
        if status is AdmitStatus.ADMITTED and int(acked) < self.replicas_ack:
            # Not on enough replicas: a failover could lose it. Taken back; the client
            # is told, and retries.
            err = not_replicated(int(acked), self.replicas_ack, self.wait_timeout_s)
            await self.cancel(spec, err)
            raise err
        return AdmitResult(
            status, n, rpm_left, rpm_reset, tpm_left, tpm_reset, retry, prior, position, eta_ms,
            displaced,
        )  # fmt: skip

    async def cancel(
        self, spec: p.JobSpec, why: ServiceError | None = None, *, queued_only: bool = False
    ) -> bool:
        """Cancel a job. True: it had not started and never will (whoever follows its
        events gets ``why``, JobCancelled by default). False: abort requested (or, with
        ``queued_only``, it runs and is left alone)."""
        why = why or JobCancelled("the job was cancelled")
        status = (
            p.StoredStatus.CANCELLED if isinstance(why, JobCancelled) else p.StoredStatus.FAILED
        )
        result = await self._cancel(
            keys={
                "admitted": names.model_admitted_key(spec.model),
                "queue": names.QUEUE,
                "job": names.job_key(spec.id),
                "in_progress": names.in_progress_key(spec.id),
                "abort": names.ABORT,
                "tenant_admitted": names.tenant_admitted_key(spec.tenant),
                "band_queue": names.band_queue_key(spec.model, spec.band, spec.tenant),
                "outcome": names.outcome_key(spec.id),
                "stored": names.stored_key(spec.id),
                "log": names.log_key(spec.id),
                "prefix": names.prefix_key(spec.id),
                "moves": names.moves_key(spec.id),
            },
            args={
                "job_id": spec.id,
                "now_ms": int(time.time() * 1000),
                "wake": names.WAKE_CHANNEL,
                "outcome_record": p.outcome_record(p.Outcome.CANCELLED),
                "outcome_ttl_ms": OUTCOME_TTL_MS,
                "events": names.events_channel(spec.id),
                "error_event": out_of_band(why),
                "new_status": status,
                "store_ttl_ms": self.store_ttl_ms,
                "queued_only": "1" if queued_only else "0",
            },
        )
        return CancelResult(int(result)) is CancelResult.NEVER_RAN

    # -- worker side -------------------------------------------------------------------
    async def mark_started(self, spec: p.JobSpec, worker_id: str, hold_s: float) -> None:
        await self._start(
            keys={
                "admitted": names.model_admitted_key(spec.model),
                "tenant_admitted": names.tenant_admitted_key(spec.tenant),
                "worker_jobs": names.worker_jobs_key(worker_id),
                "stored": names.stored_key(spec.id),
                "job": names.job_key(spec.id),
                "claims": names.worker_claims_key(worker_id),
                "deadlines": names.model_deadlines_key(spec.model),
            },
            args={
                "job_id": spec.id,
                "hold_ms": int(hold_s * 1000),
                "tenant": spec.tenant,
                "model": spec.model,
                "band": spec.band.value,
                "deadline_member": names.deadline_member(spec.band.value, spec.tenant, spec.id)
                if spec.ttft_objective_ms and not spec.best_effort
                else "",
            },
        )

    async def release(
        self,
        spec: p.JobSpec,
        worker_id: str,
        tokens_used: int | None,
        outcome: p.Outcome,
        run_s: float | None = None,
        ttft_s: float | None = None,
    ) -> None:
        """The job ended: free its places, leave its outcome record; correct the tenant's
        token bucket with the exact usage (``tokens_used``, prompt + completion; None when
        unknown). ``run_s``: how long it held its slot, for the model's service time (only
        completed jobs count: a failure's time says nothing of the next job's); ``ttft_s``:
        its engine's time to its first token (a stream's), for the model's."""
        extra = 0 if tokens_used is None else tokens_used - spec.token_estimate
        await self._release(
            keys={
                "admitted": names.model_admitted_key(spec.model),
                "tenant_admitted": names.tenant_admitted_key(spec.tenant),
                "worker_jobs": names.worker_jobs_key(worker_id),
                "tpm_bucket": names.tenant_tpm_key(spec.tenant),
                "outcome": names.outcome_key(spec.id),
                "stored": names.stored_key(spec.id),
                "log": names.log_key(spec.id),
                "done": names.model_done_key(spec.model),
                "claims": names.worker_claims_key(worker_id),
                "service": names.model_service_key(spec.model),
                "moves": names.moves_key(spec.id),
            },
            args={
                "job_id": spec.id,
                "extra": extra,
                "tpm": spec.tpm,
                "outcome_record": p.outcome_record(outcome, worker_id),
                "outcome_ttl_ms": OUTCOME_TTL_MS,
                "stored_status": p.StoredStatus.after(outcome) if spec.stored else "",
                "store_ttl_ms": self.store_ttl_ms,
                "run_ms": -1
                if run_s is None or outcome is not p.Outcome.COMPLETED
                else int(run_s * 1000),
                "ttft_ms": -1 if ttft_s is None else int(ttft_s * 1000),
            },
        )

    async def forget(self, spec: p.JobSpec, worker_id: str) -> None:
        """Remove every trace of a job that ended while Redis was unreachable."""
        await self._forget(
            keys={
                "admitted": names.model_admitted_key(spec.model),
                "tenant_admitted": names.tenant_admitted_key(spec.tenant),
                "worker_jobs": names.worker_jobs_key(worker_id),
                "queue": names.QUEUE,
                "job": names.job_key(spec.id),
                "in_progress": names.in_progress_key(spec.id),
                "outcome": names.outcome_key(spec.id),
                "claims": names.worker_claims_key(worker_id),
            },
            args={
                "job_id": spec.id,
                "outcome_record": p.outcome_record(p.Outcome.REDIS_ERROR, worker_id),
                "outcome_ttl_ms": OUTCOME_TTL_MS,
                "events": names.events_channel(spec.id),
                "error_event": out_of_band(_LOST_TRACK),
            },
        )

    async def publish_many(
        self,
        batch: dict[str, list[bytes]],
        logged: Logged | None = None,
        keep: dict[str, int] | None = None,
    ) -> list[int]:
        """Publish the encoded events of several jobs (job id -> events, in order), one
        message per job, in one round trip; returns each message's subscriber count.
        ``logged``: events to log (job id -> (seq, event)), appended to the jobs' logs
        first, in the same round trip (so a published event is always in the log); a log
        expires STORE_TTL_S from now, or ``keep[job id]`` ms (a progress log; -1: its
        expiry is left as it is)."""
        if len(batch) == 1 and not logged:  # the usual case at low load: a plain PUBLISH
            ((job_id, events),) = batch.items()  # is cheaper than a pipeline of one
            return [
                int(
                    await self.redis.publish(names.events_channel(job_id), p.encode_message(events))
                )
            ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, entries in (logged or {}).items():
                key = names.log_key(job_id)
                for seq, event in entries:
                    pipe.xadd(key, {"e": event}, id=names.log_entry_id(seq))
                ttl = (keep or {}).get(job_id, 0)
                if ttl >= 0:
                    pipe.pexpire(key, ttl or self.store_ttl_ms)
            for job_id, events in batch.items():
                pipe.publish(names.events_channel(job_id), p.encode_message(events))
            out = await pipe.execute(raise_on_error=False)
        # A refused XADD (the reaper already ended that job's log: its worker was taken
        # for dead) must not fail the other jobs of the flush; a failed PUBLISH does.
        counts = out[len(out) - len(batch) :]
        for n in counts:
            if isinstance(n, Exception):
                raise n
        return [int(n) for n in counts]
