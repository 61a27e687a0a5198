"""Gateway metrics (DESIGN §7) on a per-app registry, so tests can build several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_FAST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
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
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active = Gauge("api_active_requests", "Requests being served", registry=r)
        self.queue_depth = Gauge(
            "api_queue_depth", "Jobs waiting in Redis (read at scrape time)", registry=r
        )
        self.in_system = Gauge(
            "api_jobs_in_system",
            "Admitted jobs not yet finished, running or waiting (N)",
            registry=r,
        )
        self.capacity = Gauge(
            "api_capacity_slots", "Σ MAX_ACTIVE over live ready workers", registry=r
        )
        self.workers = Gauge("api_live_workers", "Workers with a fresh heartbeat", registry=r)
        self.ttft = Histogram(
            "api_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "api_queue_wait_seconds",
            "Admission to worker pickup",
            buckets=_FAST_BUCKETS,
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
