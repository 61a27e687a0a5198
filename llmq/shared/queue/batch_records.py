"""Files and batches as stored in Redis (keys in ``queue.names``) and their OpenAI shapes;
``output_line`` and ``failure_line`` write every line of a batch's results (the reaper's
script fills in a ``failure_line`` rendered here). The scripts are ``queue.batches``'.

A batch's status follows OpenAI's machine: ``validating`` (never seen here: the input was
validated at upload) -> ``in_progress`` -> ``finalizing`` -> ``completed``; or ``expired``
(its completion window passed), or ``cancelling`` -> ``cancelled``; ``failed`` when its
input is gone. ``ending`` records why a batch stopped early (``expired``/``cancelled``).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

BATCH_WINDOW_S = {"24h": 86_400}


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


ACTIVE = frozenset({BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING})


class _Hashed(BaseModel):
    """A flat record stored as a Redis hash of strings."""

    model_config = ConfigDict(frozen=True)

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.model_dump(mode="json").items() if v is not None}


class FileRecord(_Hashed):
    """``llmq:file:<id>``: an uploaded batch input, or a batch's output or error file."""

    id: str
    tenant: str
    purpose: str  # "batch" (uploaded) or "batch_output"
    filename: str
    bytes: int
    lines: int
    created_at: int
    expires_at: int
    models: str = ""  # JSON list: the models a batch input's lines name ("": not recorded)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class BatchRecord(_Hashed):
    """``llmq:batch:<id>``: one batch and its progress."""

    id: str
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    total: int
    next: int = 0  # the next input line to feed
    completed: int = 0
    failed: int = 0
    max_inflight: int = 1
    ending: str = ""  # "expired" / "cancelled": stop feeding, finalize as that
    metadata: str = "null"  # JSON
    routes: str = "{}"  # JSON: aliased model name -> served one, fixed at creation
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": json.loads(self.metadata),
        }
        for name in (
            "created_at",
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        ):
            out[name] = getattr(self, name)
        return out


def output_line(job_id: str, custom_id: str, status: int, body: dict[str, Any]) -> str:
    """One line of a batch's output (or error) file: OpenAI's shape."""
    return json.dumps(
        {
            "id": job_id,
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": job_id, "body": body},
            "error": None,
        },
        separators=(",", ":"),
    )


def failure_line(job_id: str, custom_id: str, code: str, message: str) -> str:
    """A request that got no response (expired, its worker lost, ...)."""
    return json.dumps(
        {
            "id": job_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        },
        separators=(",", ":"),
    )
