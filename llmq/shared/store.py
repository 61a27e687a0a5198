"""Every Redis operation of the service, atomic where it must be (the Lua scripts in
``shared.scripts``). Keys come from ``shared.protocol``; API keys are ``shared.keystore``'s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llmq.shared import keys, scripts
from llmq.shared import protocol as p
from llmq.shared.connect import not_replicated
from llmq.shared.errors import JobCancelled, QueueFull, QueueUnavailable, ServiceError
from llmq.shared.liveness import Liveness, out_of_band
from llmq.shared.lua import Registered
from llmq.shared.picking import Picking
from llmq.shared.readings import Readings
from llmq.shared.records import JobRecords
from llmq.shared.scripts import AdmitStatus, CancelResult
from llmq.shared.sealing import Sealer

__all__ = ["AdmitResult", "AdmitStatus", "Store", "TenantLimits"]

_OUTCOME_TTL_MS = p.OUTCOME_TTL_S * 1000
# What a job displaced from a full queue (a fair share: ``scripts.queue``) is told.
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
        fields[keys.STORED_MESSAGES] = messages
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
    """What the admit script weighs besides the bound (``scripts.queue``)."""

    capacity: int = 0  # the model's slots (0: no ETA)
    timeout_s: float = 0.0  # refuse (WAIT) a job expected to wait longer; 0: never
    displace: bool = False  # at the bound, the most-queued key gives a place to a lesser one


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What the admit script checks for the job's tenant (0: unlimited)."""

    max_concurrent: int = 0
    rpm: int = 0


class Store(Liveness, Picking):
    """Typed access to the Redis contract; one per process, sharing a connection pool."""

    def __init__(
        self,
        redis: Redis,
        store_ttl_s: float = 3600.0,
        replicas_ack: int = 0,
        wait_timeout_s: float = 1.0,
        sealer: Sealer | None = None,
    ) -> None:
        """``replicas_ack``: REDIS_MIN_REPLICAS_ACK, the replicas an admission waits for
        (WAIT, up to ``wait_timeout_s``). ``sealer``: PAYLOAD_KEYS (none: payloads plain)."""
        self.redis = redis
        self.sealer = sealer or Sealer()
        self.store_ttl_ms = int(store_ttl_s * 1000)  # STORE_TTL_S
        self.replicas_ack, self.wait_timeout_s = replicas_ack, wait_timeout_s
        self.records = JobRecords(redis, self.sealer)
        self._admit = Registered(redis, scripts.ADMIT)
        self._cancel = Registered(redis, scripts.CANCEL)
        self._start = Registered(redis, scripts.START)
        self._release = Registered(redis, scripts.RELEASE)
        self._reap = Registered(redis, scripts.REAP)
        self._forget = Registered(redis, scripts.FORGET)
        self._pick = Registered(redis, scripts.PICK)
        self._heartbeat = Registered(redis, scripts.HEARTBEAT)
        self._requeue = Registered(redis, scripts.REQUEUE)
        self.readings = Readings(redis)

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
        queue gives a place to a key holding fewer (``scripts.queue``). ``prefix``: the
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
                "admitted": keys.model_admitted_key(spec.model),
                "queue": keys.QUEUE,
                "job": keys.job_key(spec.id),
                "tenant_admitted": keys.tenant_admitted_key(spec.tenant),
                "rpm_bucket": keys.tenant_rpm_key(spec.tenant),
                "tpm_bucket": keys.tenant_tpm_key(spec.tenant),
                "band_index": keys.band_key(spec.model, spec.band),
                "band_queue": keys.band_queue_key(spec.model, spec.band, spec.tenant),
                "stored": keys.stored_key(spec.id),
                "idem": keys.idem_key(spec.tenant, idempotency[0] if idempotency else ""),
                "stored_index": keys.tenant_stored_key(spec.tenant),
                "service": keys.model_service_key(spec.model),
                "prefix": keys.prefix_key(spec.id),
            },
            args={
                "limit": limit,
                "hold_ms": int(hold_s * 1000),
                "payload": payload,
                "expire_ms": max(1, int(expire_s * 1000)),
                "job_id": spec.id,
                "score_ms": spec.enqueued_at_ms,
                "wake": keys.WAKE_CHANNEL,
                "wake_message": keys.wake_for(spec.model),
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
                "bands_prefix": keys.model_bands_prefix(spec.model),
                "band": spec.band.value,
                "displace": "1" if q.displace else "0",
                "displaced_event": _DISPLACED_EVENT,
                "displaced_outcome": p.outcome_record(p.Outcome.DISPLACED),
                "outcome_ttl_ms": _OUTCOME_TTL_MS,
                "prefix_hashes": " ".join(prefix),
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
                "admitted": keys.model_admitted_key(spec.model),
                "queue": keys.QUEUE,
                "job": keys.job_key(spec.id),
                "in_progress": keys.in_progress_key(spec.id),
                "abort": keys.ABORT,
                "tenant_admitted": keys.tenant_admitted_key(spec.tenant),
                "band_queue": keys.band_queue_key(spec.model, spec.band, spec.tenant),
                "outcome": keys.outcome_key(spec.id),
                "stored": keys.stored_key(spec.id),
                "log": keys.log_key(spec.id),
                "prefix": keys.prefix_key(spec.id),
            },
            args={
                "job_id": spec.id,
                "now_ms": int(time.time() * 1000),
                "wake": keys.WAKE_CHANNEL,
                "outcome_record": p.outcome_record(p.Outcome.CANCELLED),
                "outcome_ttl_ms": _OUTCOME_TTL_MS,
                "events": keys.events_channel(spec.id),
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
                "admitted": keys.model_admitted_key(spec.model),
                "tenant_admitted": keys.tenant_admitted_key(spec.tenant),
                "worker_jobs": keys.worker_jobs_key(worker_id),
                "stored": keys.stored_key(spec.id),
                "job": keys.job_key(spec.id),
                "claims": keys.worker_claims_key(worker_id),
            },
            args={
                "job_id": spec.id,
                "hold_ms": int(hold_s * 1000),
                "tenant": spec.tenant,
                "model": spec.model,
            },
        )

    async def release(
        self,
        spec: p.JobSpec,
        worker_id: str,
        tokens_used: int | None,
        outcome: p.Outcome,
        run_s: float | None = None,
    ) -> None:
        """The job ended: free its places, leave its outcome record; correct the tenant's
        token bucket with the exact usage (``tokens_used``, prompt + completion; None when
        unknown). ``run_s``: how long it held its slot, for the model's service time (only
        completed jobs count: a failure's time says nothing of the next job's)."""
        extra = 0 if tokens_used is None else tokens_used - spec.token_estimate
        await self._release(
            keys={
                "admitted": keys.model_admitted_key(spec.model),
                "tenant_admitted": keys.tenant_admitted_key(spec.tenant),
                "worker_jobs": keys.worker_jobs_key(worker_id),
                "tpm_bucket": keys.tenant_tpm_key(spec.tenant),
                "outcome": keys.outcome_key(spec.id),
                "stored": keys.stored_key(spec.id),
                "log": keys.log_key(spec.id),
                "done": keys.model_done_key(spec.model),
                "claims": keys.worker_claims_key(worker_id),
                "service": keys.model_service_key(spec.model),
            },
            args={
                "job_id": spec.id,
                "extra": extra,
                "tpm": spec.tpm,
                "outcome_record": p.outcome_record(outcome, worker_id),
                "outcome_ttl_ms": _OUTCOME_TTL_MS,
                "stored_status": p.StoredStatus.after(outcome) if spec.stored else "",
                "store_ttl_ms": self.store_ttl_ms,
                "run_ms": -1
                if run_s is None or outcome is not p.Outcome.COMPLETED
                else int(run_s * 1000),
            },
        )

    async def forget(self, spec: p.JobSpec, worker_id: str) -> None:
        """Remove every trace of a job that ended while Redis was unreachable."""
        await self._forget(
            keys={
                "admitted": keys.model_admitted_key(spec.model),
                "tenant_admitted": keys.tenant_admitted_key(spec.tenant),
                "worker_jobs": keys.worker_jobs_key(worker_id),
                "queue": keys.QUEUE,
                "job": keys.job_key(spec.id),
                "in_progress": keys.in_progress_key(spec.id),
                "outcome": keys.outcome_key(spec.id),
                "claims": keys.worker_claims_key(worker_id),
            },
            args={
                "job_id": spec.id,
                "outcome_record": p.outcome_record(p.Outcome.REDIS_ERROR, worker_id),
                "outcome_ttl_ms": _OUTCOME_TTL_MS,
                "events": keys.events_channel(spec.id),
                "error_event": out_of_band(_LOST_TRACK),
            },
        )

    async def publish_many(
        self,
        batch: dict[str, list[bytes]],
        logged: Logged | None = None,
    ) -> list[int]:
        """Publish the encoded events of several jobs (job id -> events, in order), one
        message per job, in one round trip; returns each message's subscriber count.
        ``logged``: events of stored jobs (job id -> (seq, event)) appended to their logs
        first, in the same round trip (so a published event is always in the log)."""
        if len(batch) == 1 and not logged:  # the usual case at low load: a plain PUBLISH
            ((job_id, events),) = batch.items()  # is cheaper than a pipeline of one
            return [
                int(await self.redis.publish(keys.events_channel(job_id), p.encode_message(events)))
            ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, entries in (logged or {}).items():
                key = keys.log_key(job_id)
                for seq, event in entries:
                    pipe.xadd(key, {"e": event}, id=keys.log_entry_id(seq))
                pipe.pexpire(key, self.store_ttl_ms)
            for job_id, events in batch.items():
                pipe.publish(keys.events_channel(job_id), p.encode_message(events))
            out = await pipe.execute(raise_on_error=False)
        # A refused XADD (the reaper already ended that job's log: its worker was taken
        # for dead) must not fail the other jobs of the flush; a failed PUBLISH does.
        counts = out[len(out) - len(batch) :]
        for n in counts:
            if isinstance(n, Exception):
                raise n
        return [int(n) for n in counts]
