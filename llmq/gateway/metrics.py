"""Gateway metrics (names kept from the original design) on a per-app registry, so tests
can build several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmq.gateway.scaling import ModelRow
from llmq.shared.buckets import FAST_BUCKETS, LATENCY_BUCKETS
from llmq.shared.protocol import BANDS
from llmq.shared.queue.batch_records import ACTIVE as BATCH_ACTIVE

# Why a request was refused or ended early (api_rejections_total{reason}); error codes of
# shared.errors, plus client_cancelled. Every reason is exported from the start (at 0).
REJECTION_REASONS = (
    "queue_full",
    "server_busy",
    "queue_timeout",
    "engine_unavailable",
    "queue_unavailable",
    "request_timeout",
    "shutting_down",
    "client_cancelled",
    "worker_lost",
    "stream_interrupted",
    "concurrency_limit_exceeded",
    "rate_limit_exceeded",
    "invalid_api_key",
    "deadline_unattainable",
)

# Why a request with a time-to-first-token objective was not served (api_deadline_refusals
# {reason}): refused at admission (its predicted time to first token exceeded it), or
# dropped from the queue when its deadline passed. And what became of every such request
# (api_ttft_objective{result}): attainment is met / all.
DEADLINE_REASONS = ("unattainable", "expired")
OBJECTIVE_RESULTS = ("met", "missed", "refused", "dropped")


# Why a request went to a fallback (api_model_fallbacks_total{reason}).
FALLBACK_REASONS = ("unavailable", "busy")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "api_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.undecryptable = Counter(
            "api_payload_undecryptable",
            "Sealed payloads (events, stored messages, files) no key of PAYLOAD_KEYS opens",
            registry=r,
        )
        self.latency = Histogram(
            "api_request_latency_seconds",
            "HTTP request latency to the last byte (model: a chat request's, once known)",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # multiprocess_mode: how GATEWAY_PROCESSES > 1 combines the processes' values
        # (ignored with one process).
        self.active = Gauge(
            "api_active_requests",
            "Requests being served",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Per model (labels bounded: WorkerRegistry.labelled_models); read from Redis by the
        # gauges loop, so every replica reports the same truth.
        self.queue_depth = Gauge(
            "api_queue_depth",
            "Jobs waiting, by model",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.in_system = Gauge(
            "api_jobs_in_system",
            "Admitted jobs not yet finished, running or waiting (N), by model",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.capacity = Gauge(
            "api_capacity_slots",
            "Σ MAX_ACTIVE over live ready workers serving the model",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.workers = Gauge(
            "api_live_workers",
            "Workers with a fresh heartbeat",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.redis_replicas = Gauge(
            "api_redis_replicas",
            "Replicas connected and online, as the Redis primary says",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.redis_replica_lag = Gauge(
            "api_redis_replica_lag_seconds",
            "Seconds since the slowest online replica acknowledged the primary",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.redis_failovers = Counter(
            "api_redis_primary_changes",
            "Times the Redis primary this gateway reaches changed (a failover)",
            registry=r,
        )
        self.running = Gauge(
            "api_running_jobs",
            "Admitted jobs not waiting (started), by model",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.model_workers = Gauge(
            "api_model_ready_workers",
            "Live workers with a ready engine serving the model",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.drain_rate = Gauge(
            "api_model_drain_rate",
            "Jobs of the model ending per second (all workers, smoothed)",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.desired_workers = Gauge(
            "api_model_desired_workers",
            "Workers the model needs for its load (the scaling signal; gateway.scaling)",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.redis_up = Gauge(
            "api_redis_up",
            "1 when this gateway's last Redis round trip worked",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ttft = Histogram(
            "api_time_to_first_token_seconds",
            "Request arrival to first token",
            ["model"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "api_queue_wait_seconds",
            "Admission to worker pickup",
            ["model"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.completion_tokens = Counter(
            "api_completion_tokens", "Completion tokens relayed", registry=r
        )
        self.prompt_tokens = Counter(
            "api_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.admissions = Counter(
            "api_admissions", "Chat requests admitted, by model", ["model"], registry=r
        )
        self.rejections = Counter(
            "api_rejections",
            'Requests refused or ended early, by reason and model ("": before a model was '
            "known: an unknown one, a bad key, a full Redis)",
            ["reason", "model"],
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason, "")
        # Per tenant: labelled by the API key's *name* (never the secret); the number of
        # keys is bounded by the operator.
        self.tenant_requests = Counter(
            "api_tenant_requests", "Chat requests by API key name", ["key"], registry=r
        )
        self.tenant_rejections = Counter(
            "api_tenant_rejections",
            "Requests refused or ended early, by API key name and reason",
            ["key", "reason"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "api_tenant_tokens",
            "Tokens by API key name and kind (prompt, completion)",
            ["key", "kind"],
            registry=r,
        )
        self.band_queue_wait = Histogram(
            "api_band_queue_wait_seconds",
            "Admission to worker pickup, by priority band",
            ["band"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.band_depth = Gauge(
            "api_queue_depth_band",
            "Jobs waiting, by priority band and model",
            ["band", "model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.batches = Gauge(
            "api_batches",
            "Batches in flight, by status (read from Redis)",
            ["status"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        for status in BATCH_ACTIVE:
            self.batches.labels(status)
        self.fallbacks = Counter(
            "api_model_fallbacks",
            "Requests a model could not take sent to one of its MODEL_FALLBACKS, by requested "
            "and serving model and reason (unavailable: no ready engine; busy: its queue "
            "refused them)",
            ["requested", "served", "reason"],
            registry=r,
        )
        self.deadline_refusals = Counter(
            "api_deadline_refusals",
            "Requests refused (unattainable) or dropped from the queue (expired) because their "
            "time-to-first-token objective could not be met, by model, band and reason",
            ["model", "band", "reason"],
            registry=r,
        )
        self.objective = Counter(
            "api_ttft_objective",
            "Requests with a time-to-first-token objective by result (met, missed, refused, "
            "dropped), model and band",
            ["model", "band", "result"],
            registry=r,
        )
        self._exported: set[str] = set()  # models with per-model series

    def fallback_pairs(self, fallbacks: dict[str, tuple[str, ...]]) -> None:
        """Every MODEL_FALLBACKS pair exported from the start (at 0), so that its rate exists
        before the first fallback."""
        for model, served in fallbacks.items():
            for other in served:
                for reason in FALLBACK_REASONS:
                    self.fallbacks.labels(model, other, reason)

    def deadline(self, model: str, band: str, reason: str) -> None:
        """A request with an objective refused (``unattainable``) or dropped (``expired``)."""
        self.deadline_refusals.labels(model, band, reason).inc()
        self.objective_result(model, band, "refused" if reason == "unattainable" else "dropped")

    def objective_result(self, model: str, band: str, result: str) -> None:
        """What became of a request with an objective (OBJECTIVE_RESULTS)."""
        self.objective.labels(model, band, result).inc()

    def reject(self, code: str | None, tenant: str | None = None, model: str = "") -> None:
        """Count a refusal by its error code; other errors (engine refusals) are not counted."""
        if code in REJECTION_REASONS:
            self.rejections.labels(code, model).inc()
            if tenant:
                self.tenant_rejections.labels(tenant, code).inc()

    def export_models(self, rows: dict[str, ModelRow]) -> None:
        """Set the per-model gauges; a model that left the labelled set loses its series."""
        per_model = (
            self.queue_depth,
            self.in_system,
            self.capacity,
            self.running,
            self.model_workers,
            self.drain_rate,
            self.desired_workers,
        )
        for gone in self._exported - set(rows):
            for gauge in per_model:
                gauge.remove(gone)
            for band in BANDS:
                self.band_depth.remove(band, gone)
        for model, row in rows.items():
            self.queue_depth.labels(model).set(row.load.waiting)
            self.in_system.labels(model).set(row.load.in_system)
            self.running.labels(model).set(row.load.running)
            self.capacity.labels(model).set(row.capacity)
            self.model_workers.labels(model).set(row.workers)
            self.drain_rate.labels(model).set(row.drain_per_s)
            self.desired_workers.labels(model).set(row.desired_workers)
            for band, n in row.load.waiting_by_band.items():
                self.band_depth.labels(band, model).set(n)
        self._exported = set(rows)
