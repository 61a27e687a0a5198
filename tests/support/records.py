"""Records of the Redis contract, built for tests."""

from __future__ import annotations

import time
from typing import Any

from llmq.shared.protocol import JobSpec, WorkerInfo


def worker_info(worker_id: str = "w", **overrides: Any) -> WorkerInfo:
    """A ready worker's heartbeat serving model "m" (fields overridable)."""
    fields: dict[str, Any] = {
        "worker_id": worker_id,
        "max_active": 2,
        "active": 0,
        "models": ("m",),
        "engine_ready": True,
        "engine_url": "http://e",
        "started_at": 1.0,
    }
    return WorkerInfo(**{**fields, **overrides})


def job_spec(job_id: str, **overrides: Any) -> JobSpec:
    """A streamed job for model "m", enqueued now (fields overridable)."""
    fields: dict[str, Any] = {
        "id": job_id,
        "model": "m",
        "stream": True,
        "include_usage": False,
        "enqueued_at_ms": int(time.time() * 1000),
        "body": {"model": "m"},
    }
    return JobSpec(**{**fields, **overrides})
