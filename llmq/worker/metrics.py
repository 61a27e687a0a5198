"""Worker metrics, on their own registry, served on WORKER_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmq.shared.buckets import FAST_BUCKETS
from llmq.shared.protocol import Outcome

# How a job ended (worker_jobs_total{outcome}); every outcome a worker records is exported
# from the start (worker_lost is the reaper's: the job's worker is gone; displaced, the
# admit script's).
OUTCOMES = tuple(o.value for o in Outcome if o not in (Outcome.WORKER_LOST, Outcome.DISPLACED))
AFFINITY_RESULTS = ("hit", "miss", "cold")
# Why a job was handed over to another worker (worker_jobs_migrated_total{reason}).
MIGRATION_REASONS = ("worker_lost", "engine_error", "engine_stall", "drain")
MIGRATION_TOKENS = ("reprefilled", "regenerated")
_RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # multiprocess_mode: how WORKER_PROCESSES > 1 combines the processes' values.
        self.active = Gauge(
            "worker_active_jobs",
            "Jobs running on this worker",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.max_active = Gauge(
            "worker_max_active",
            "Slots of this worker (MAX_ACTIVE; with MAX_ACTIVE=auto, its live limit)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.jobs = Counter("worker_jobs", "Jobs finished, by outcome", ["outcome"], registry=r)
        self.tpot = Gauge(
            "worker_engine_tpot_seconds",
            "MAX_ACTIVE=auto: the engine's mean time per output token in the last window, "
            "from this worker's streams",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.preempted = Counter(
            "worker_engine_preempted_windows",
            "MAX_ACTIVE=auto: windows in which the engine preempted requests (the limit "
            "backed off)",
            registry=r,
        )
        self.dropped_late = Counter(
            "worker_jobs_dropped_late",
            "Waiting jobs dropped because their time-to-first-token deadline passed (by the "
            "pick or the sweep of this worker; the gateways count them per model and band)",
            registry=r,
        )
        self.migrated = Counter(
            "worker_jobs_migrated",
            "Migrated jobs this worker took over (counted once each, by why they moved: their "
            "worker was lost, its engine failed or stalled, or it drained)",
            ["reason"],
            registry=r,
        )
        self.migrations = Histogram(
            "worker_job_migrations",
            "Migrations of each job that ended on this worker (0: none)",
            buckets=(0, 1, 2, 3, 5),
            registry=r,
        )
        self.migration_tokens = Counter(
            "worker_migration_tokens",
            "The cost of migrations in engine tokens: reprefilled (a continued answer's prompt "
            "and answer so far, prefilled again) and regenerated (the answer of a job run again "
            "from its start)",
            ["kind"],
            registry=r,
        )
        for reason in MIGRATION_REASONS:
            self.migrated.labels(reason)
        for kind in MIGRATION_TOKENS:
            self.migration_tokens.labels(kind)
        self.undecryptable = Counter(
            "worker_payload_undecryptable",
            "Sealed payloads (jobs, batch files) no key of PAYLOAD_KEYS opens",
            registry=r,
        )
        self.batch_requests = Counter(
            "worker_batch_requests", "Batch requests finished, by result", ["result"], registry=r
        )
        self.batch_tokens = Counter(
            "worker_batch_tokens", "Tokens (prompt + completion) of batch requests", registry=r
        )
        self.batches = Counter(
            "worker_batches", "Batches finalized, by final status", ["status"], registry=r
        )
        self.engine_ttft = Histogram(
            "worker_engine_ttft_seconds",
            "Engine time to first token, from the request to the engine",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.pickup = Histogram(
            "worker_pickup_latency_seconds",
            "Enqueue to job start",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("worker_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("worker_prompt_tokens", "Prompt tokens processed", registry=r)
        self.engine_up = Gauge(
            "worker_engine_up",
            "1 when the engine answers /v1/models",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_up = Gauge(
            "worker_redis_up",
            "1 when this worker's last heartbeat reached Redis",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.decode_rate = Histogram(
            "worker_decode_tokens_per_second",
            "Per job: completion tokens over the time from first token to end of stream",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.affinity = Counter(
            "worker_affinity_picks",
            "Jobs picked, by cache affinity: hit (this engine held the deepest prefix known), "
            "miss (another live worker's held more), cold (none held any)",
            ["result"],
            registry=r,
        )
        self.affinity_wait = Histogram(
            "worker_affinity_wait_seconds",
            "Jobs left for a warmer worker: from the first time a pick left one to its pickup",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.embed_batch = Histogram(
            "worker_embedding_request_jobs",
            "Per embeddings request to the engine: the jobs merged into it (_count: engine "
            "requests, _sum: jobs)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        for result in AFFINITY_RESULTS:
            self.affinity.labels(result)
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
        for result in ("completed", "failed"):
            self.batch_requests.labels(result)
