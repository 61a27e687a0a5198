"""Worker metrics (DESIGN §7), on their own registry, served on WORKER_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.buckets import FAST_BUCKETS


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active = Gauge("worker_active_jobs", "Jobs running on this worker", registry=r)
        self.max_active = Gauge(
            "worker_max_active", "Slots of this worker (MAX_ACTIVE)", registry=r
        )
        self.jobs = Counter("worker_jobs", "Jobs finished, by outcome", ["outcome"], registry=r)
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
            "worker_engine_up", "1 when the engine answers /v1/models", registry=r
        )
