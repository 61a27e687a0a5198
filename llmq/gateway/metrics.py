"""Gateway metrics (names kept from the original design) on a per-app registry, so tests
can build several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmq.shared.batch_records import ACTIVE as BATCH_ACTIVE
from llmq.shared.buckets import FAST_BUCKETS, LATENCY_BUCKETS
from llmq.shared.protocol import BANDS

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
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "api_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "api_request_latency_seconds",
            "HTTP request latency to the last byte",
            ["route"],
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
        self.queue_depth = Gauge(
            "api_queue_depth",
            "Jobs waiting in Redis (read at scrape time)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.in_system = Gauge(
            "api_jobs_in_system",
            "Admitted jobs not yet finished, running or waiting (N)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.capacity = Gauge(
            "api_capacity_slots",
            "Σ MAX_ACTIVE over live ready workers",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.workers = Gauge(
            "api_live_workers",
            "Workers with a fresh heartbeat",
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
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "api_queue_wait_seconds",
            "Admission to worker pickup",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.completion_tokens = Counter(
            "api_completion_tokens", "Completion tokens relayed", registry=r
        )
        self.prompt_tokens = Counter(
            "api_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.rejections = Counter(
            "api_rejections", "Requests refused or ended early, by reason", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
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
            "Jobs waiting, by priority band",
            ["band"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        for band in BANDS:
            self.band_depth.labels(band)
        self.batches = Gauge(
            "api_batches",
            "Batches in flight, by status (read from Redis)",
            ["status"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        for status in BATCH_ACTIVE:
            self.batches.labels(status)

    def reject(self, code: str | None, tenant: str | None = None) -> None:
        """Count a refusal by its error code; other errors (engine refusals) are not counted."""
        if code in REJECTION_REASONS:
            self.rejections.labels(code).inc()
            if tenant:
                self.tenant_rejections.labels(tenant, code).inc()
