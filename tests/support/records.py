"""Records of the Redis contract, built for tests."""

from __future__ import annotations

from typing import Any

from llmq.shared.protocol import WorkerInfo


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
