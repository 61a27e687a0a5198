"""Every Redis key and channel name of the service (as arq's ``constants.py``): the
one place key strings are built. The messages that cross Redis are ``shared.protocol``'s.

Keys and channels
    llmq:queue              zset    the arq queue (arq keeps running jobs in it until they end)
    llmq:replicated         string  a marker written before WAIT (REDIS_MIN_REPLICAS_ACK), 60 s
    arq:job:<id>            string  the arq job payload, JSON (readable with redis-cli GET)
    arq:in-progress:<id>    string  arq's running marker
    arq:result:<id>         -       not kept (arq's result repeats the job's arguments: the
                                    prompt); llmq:outcome:<id> is kept instead
    llmq:outcome:<id>       string  how a job ended, JSON {"outcome", "worker"}, kept
                                    OUTCOME_TTL_S; never any prompt or completion text
    arq:abort               zset    arq's abort requests
    llmq:models             zset    every model a worker served; score = its last heartbeat (ms)
    llmq:models:served      zset    model -> when last served (llmq:band:served's counter): the
                                    order a worker serving several models shares its slots in
    llmq:model:<m>:admitted zset    the model's admitted, unfinished jobs; score = deadline
                                    (ms, Redis clock): its bound counts these
    llmq:model:<m>:done     string  jobs of the model that ended (a counter: the drain rate)
    llmq:workers            zset    live-worker index; score = heartbeat expiry (ms, Redis clock)
    llmq:worker:<id>        hash    heartbeat of one worker (WorkerInfo), with a TTL
    llmq:worker-jobs:<id>   hash    job id -> JSON [tenant, model, band], for the jobs a
                                    worker started and not ended
    llmq:worker-claims:<id> hash    job id -> JSON [tenant, model, band, enqueue ms, claimed
                                    ms]: jobs the worker picked and has not started yet
                                    (a pick whose reply was lost: they go back to the queue)
    llmq:prefix:<id>        hash    a waiting job's prefix signature (shared.prefix): h =
                                    its chained block hashes (hex, space-separated), p = when
                                    a pick first left it for a warmer worker (ms); expires
                                    with the job's payload, deleted when it is picked
    llmq:worker-prefixes:<id>  zset the prefix hashes a worker's engine probably caches
                                    (what it picked lately); score = last picked (ms);
                                    bounded (AFFINITY_RECORD_MAX), entries and key expire
                                    after AFFINITY_TTL_S, deleted when the worker leaves or dies
    llmq:prefix-owners      hash    prefix hash -> the worker that picked it last (an index
                                    of the records above, checked against them)
    llmq:prefix-seen        zset    prefix hash -> when last picked: bounds the index
    llmq:apikeys            hash    API key name -> digest (sha256 of the secret)
    llmq:apikey:<digest>    hash    one API key: name, limits, priority band (ApiKey)
    llmq:tenant:<name>:admitted  zset  the tenant's admitted, unfinished jobs (deadlines)
    llmq:tenant:<name>:rpm  hash    the tenant's request bucket {t: tokens, ts: ms}
    llmq:tenant:<name>:tpm  hash    the tenant's token bucket {t, ts}
    llmq:model:<m>:band:<band>  zset  tenants with jobs for the model waiting in the band;
                                    score = when last served (a counter: llmq:band:served;
                                    0 = not since idle)
    llmq:model:<m>:band:<band>:<name>  zset  the tenant's waiting jobs for the model in the
                                    band; score = enqueue ms
    llmq:events:<id>        pubsub  the job's events, sequence-numbered (Event)
    llmq:wake               pubsub  wakes idle workers: "model:<m>" (a job for that model
                                    was enqueued: only its workers wake), anything else (an
                                    abort, a batch created) wakes every worker
    llmq:stored:<id>        hash    a stored job (StoredJob: owner, status, metadata, ...),
                                    kept STORE_TTL_S; no completion text; its request's
                                    messages (field ``messages``, JSON) only when the
                                    client sent ``store: true`` (not for an Idempotency-Key
                                    alone)
    llmq:log:<id>           stream  a job's events, entry id ``0-<seq>`` (``<ms>-<n>`` for an
                                    out-of-band one), field ``e`` = the event as published: a
                                    stored job's, kept STORE_TTL_S after the job ended; with
                                    MIGRATE on, every other job's non-terminal events too
                                    (its progress, what a migration continues from), deleted
                                    when it ends
    llmq:moves:<id>         hash    a job's migrations (``queue.migration``): n = how many,
                                    why = the last one's reason, s = its arq queue score, p =
                                    its arq payload while it waits to be resumed; deleted when
                                    it ends
    llmq:model:<m>:resume   zset    the model's migrated jobs waiting for a worker, taken
                                    before any other; member "<band>:<key>:<job id>", score =
                                    when it was handed over (ms)
    llmq:idem:<tenant>:<h>  string  ``<job id> <body digest>`` for an Idempotency-Key
                                    (h = sha256 of the key), kept STORE_TTL_S
    llmq:file:<id>          hash    an uploaded or result file (FileRecord), kept FILE_TTL_S
    llmq:file:<id>:lines    list    its JSONL lines
    llmq:batch:<id>         hash    a batch (BatchRecord: status, counts, progress)
    llmq:batch:<id>:out     hash    line index -> output line, until the batch is finalized
    llmq:batch:<id>:err     hash    line index -> error line, until the batch is finalized
    llmq:batch:<id>:inflight set    the batch's job ids queued or running
    llmq:batches:active     set     batches that workers feed or finalize
    llmq:tenant:<name>:batches zset a key's batches; score = created (ms)
    llmq:tenant:<name>:files zset   a key's files; score = created (µs); expired ones are
                                    dropped when a listing finds them gone
    llmq:tenant:<name>:stored zset  a key's stored completions; score = enqueue (ms); pruned
                                    the same way
"""

from __future__ import annotations

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix

QUEUE = "llmq:queue"
REPLICATION_MARK = "llmq:replicated"  # written before a WAIT (REDIS_MIN_REPLICAS_ACK)
WORKERS = "llmq:workers"
WAKE_CHANNEL = "llmq:wake"
ABORT = abort_jobs_ss
OUTCOME_PREFIX = "llmq:outcome:"
EVENTS_PREFIX = "llmq:events:"
STORED_PREFIX = "llmq:stored:"
LOG_PREFIX = "llmq:log:"


def job_key(job_id: str) -> str:
    return job_key_prefix + job_id


def in_progress_key(job_id: str) -> str:
    return in_progress_key_prefix + job_id


IN_PROGRESS_PREFIX = in_progress_key_prefix
RETRY_PREFIX = retry_key_prefix  # arq's try counter (a resumed job's is reset)
MOVES_PREFIX = "llmq:moves:"


def moves_key(job_id: str) -> str:
    return MOVES_PREFIX + job_id


def outcome_key(job_id: str) -> str:
    return OUTCOME_PREFIX + job_id


def events_channel(job_id: str) -> str:
    return EVENTS_PREFIX + job_id


STORED_MESSAGES = "messages"  # the field of a stored record that holds the messages


def stored_key(job_id: str) -> str:
    return STORED_PREFIX + job_id


def log_key(job_id: str) -> str:
    return LOG_PREFIX + job_id


def log_entry_id(seq: int) -> str:
    """A logged event's stream entry id: ``0-<seq>``, so that XRANGE reads by number."""
    return f"0-{seq}"


FILE_PREFIX = "llmq:file:"
BATCH_PREFIX = "llmq:batch:"
ACTIVE_BATCHES = "llmq:batches:active"
BATCH_JOB_PREFIX = "breq_"  # a batch request's job id: breq_<batch id>_<line index>


def file_key(file_id: str) -> str:
    return FILE_PREFIX + file_id


def file_lines_key(file_id: str) -> str:
    return f"{FILE_PREFIX}{file_id}:lines"


def batch_key(batch_id: str) -> str:
    return BATCH_PREFIX + batch_id


BATCH_OUT, BATCH_ERR, BATCH_INFLIGHT = "out", "err", "inflight"  # parts of a batch


def batch_part_key(batch_id: str, part: str) -> str:
    """``BATCH_OUT``, ``BATCH_ERR`` or ``BATCH_INFLIGHT`` of a batch (or its lock)."""
    return f"{BATCH_PREFIX}{batch_id}:{part}"


def tenant_batches_key(tenant: str) -> str:
    return f"{TENANT_PREFIX}{tenant}:batches"


def tenant_files_key(tenant: str) -> str:
    return f"{TENANT_PREFIX}{tenant}:files"


def tenant_stored_key(tenant: str) -> str:
    return f"{TENANT_PREFIX}{tenant}:stored"


def batch_job_id(batch_id: str, index: int) -> str:
    return f"{BATCH_JOB_PREFIX}{batch_id}_{index}"


def idem_key(tenant: str, key_digest: str) -> str:
    return f"llmq:idem:{tenant}:{key_digest}"


WORKER_PREFIX = "llmq:worker:"


def worker_key(worker_id: str) -> str:
    return WORKER_PREFIX + worker_id


WORKER_JOBS_PREFIX = "llmq:worker-jobs:"
WORKER_CLAIMS_PREFIX = "llmq:worker-claims:"


def worker_jobs_key(worker_id: str) -> str:
    return WORKER_JOBS_PREFIX + worker_id


def worker_claims_key(worker_id: str) -> str:
    return WORKER_CLAIMS_PREFIX + worker_id


WORKER_PREFIXES_PREFIX = "llmq:worker-prefixes:"
PREFIX_PREFIX = "llmq:prefix:"
PREFIX_OWNERS = "llmq:prefix-owners"
PREFIX_SEEN = "llmq:prefix-seen"


def worker_prefixes_key(worker_id: str) -> str:
    return WORKER_PREFIXES_PREFIX + worker_id


def prefix_key(job_id: str) -> str:
    return PREFIX_PREFIX + job_id


API_KEYS = "llmq:apikeys"
TENANT_PREFIX = "llmq:tenant:"
BAND_SERVED = "llmq:band:served"  # the counter that orders tenants (and models) in a band
MODELS = "llmq:models"
MODELS_SERVED = "llmq:models:served"
MODEL_PREFIX = "llmq:model:"
# Parts of a model's keys (MODEL_PREFIX + model + part), also built by the scripts.
ADMITTED_PART, DONE_PART, BAND_PART = ":admitted", ":done", ":band:"
SERVICE_PART = ":service"  # hash: ms (a job's service time, smoothed), n (jobs measured),
# ttft / ttft_at (the engine's time to first token, smoothed, and when last measured)
DEADLINES_PART = ":deadlines"  # zset: "<band>:<key>:<job id>" -> its deadline (Redis ms)
RESUME_PART = ":resume"  # zset: "<band>:<key>:<job id>" -> when handed over (Redis ms)
WAKE_MODEL = "model:"  # a wake-up for a model's workers: WAKE_MODEL + model


def wake_for(model: str) -> str:
    return WAKE_MODEL + model


def model_admitted_key(model: str) -> str:
    return MODEL_PREFIX + model + ADMITTED_PART


def model_done_key(model: str) -> str:
    return MODEL_PREFIX + model + DONE_PART


def model_service_key(model: str) -> str:
    """How long the model's jobs take (workers update it as jobs complete): the ETA's base."""
    return MODEL_PREFIX + model + SERVICE_PART


def model_deadlines_key(model: str) -> str:
    """The model's waiting jobs that are dropped when their deadline passes unstarted
    (``queue.waiting``), scored by that deadline; members are ``deadline_member``'s."""
    return MODEL_PREFIX + model + DEADLINES_PART


def deadline_member(band: str, tenant: str, job_id: str) -> str:
    """What the drop needs of a job: its band queue (band, key) and id. Neither a band nor a
    key name holds a ":" (BAND_QUEUE_SEP)."""
    return f"{band}{BAND_QUEUE_SEP}{tenant}{BAND_QUEUE_SEP}{job_id}"


def model_resume_key(model: str) -> str:
    """The model's migrated jobs waiting to be resumed (``queue.migration``); members are
    ``deadline_member``'s."""
    return MODEL_PREFIX + model + RESUME_PART


def model_bands_prefix(model: str) -> str:
    """band_key(model, band) is this + band (the scripts that walk every band build it)."""
    return MODEL_PREFIX + model + BAND_PART


def api_key_record(digest: str) -> str:
    return f"llmq:apikey:{digest}"


TENANT_ADMITTED_SUFFIX = ":admitted"


def tenant_admitted_key(tenant: str) -> str:
    return f"{TENANT_PREFIX}{tenant}{TENANT_ADMITTED_SUFFIX}"


def tenant_rpm_key(tenant: str) -> str:
    return f"{TENANT_PREFIX}{tenant}:rpm"


def tenant_tpm_key(tenant: str) -> str:
    return f"{TENANT_PREFIX}{tenant}:tpm"


def band_key(model: str, band: str) -> str:
    """The model's tenants with jobs waiting in the band."""
    return MODEL_PREFIX + model + BAND_PART + band


BAND_QUEUE_SEP = ":"  # band_key(...) + BAND_QUEUE_SEP + tenant: a tenant's queue in a band


def band_queue_key(model: str, band: str, tenant: str) -> str:
    return f"{band_key(model, band)}{BAND_QUEUE_SEP}{tenant}"
