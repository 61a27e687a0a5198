"""The Redis contract: every key, channel and message that crosses Redis.

No other module writes a key string; they call the functions here.

Keys and channels
    llmq:queue              zset    the arq queue (arq keeps running jobs in it until they end)
    arq:job:<id>            string  the arq job payload, JSON (readable with redis-cli GET)
    arq:in-progress:<id>    string  arq's running marker
    arq:result:<id>         string  arq's result, JSON, kept RESULT_TTL_S
    arq:abort               zset    arq's abort requests
    llmq:admitted           zset    admitted, unfinished jobs; score = deadline (ms, Redis clock)
    llmq:workers            zset    live-worker index; score = heartbeat expiry (ms, Redis clock)
    llmq:worker:<id>        hash    heartbeat of one worker (WorkerInfo), with a TTL
    llmq:worker-jobs:<id>   set     ids of the jobs a worker has started and not yet ended
    llmq:events:<id>        pubsub  the job's events, sequence-numbered (Event)
    llmq:wake               pubsub  "a job was enqueued or aborted": wakes idle workers

Event wire format: ``"<seq> <type> <data>"``, one pub/sub message each. ``data`` of a
``chunk`` event is the OpenAI chunk JSON exactly as the gateway sends it to the client, so the
per-token relay path neither parses JSON nor decodes text. The job's worker numbers its
events from 1; sequence number 0 (``OUT_OF_BAND``) marks a terminal event published by
someone else (the reaper's ``worker_lost``), which the gateway accepts whatever it has seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix
from pydantic import BaseModel, ConfigDict

QUEUE = "llmq:queue"
ADMITTED = "llmq:admitted"
WORKERS = "llmq:workers"
WAKE_CHANNEL = "llmq:wake"
ABORT = abort_jobs_ss
JOB_FUNCTION = "chat"
RESULT_TTL_S = 300
EVENTS_PREFIX = "llmq:events:"


def job_key(job_id: str) -> str:
    return job_key_prefix + job_id


def in_progress_key(job_id: str) -> str:
    return in_progress_key_prefix + job_id


IN_PROGRESS_PREFIX = in_progress_key_prefix


def events_channel(job_id: str) -> str:
    return EVENTS_PREFIX + job_id


def worker_key(worker_id: str) -> str:
    return f"llmq:worker:{worker_id}"


WORKER_JOBS_PREFIX = "llmq:worker-jobs:"


def worker_jobs_key(worker_id: str) -> str:
    return WORKER_JOBS_PREFIX + worker_id


OUT_OF_BAND = 0  # sequence number of a terminal event not sent by the job's worker


def json_dumps(obj: Any) -> bytes:
    """arq's job/result serializer: JSON, never pickle. Exceptions become their repr."""
    return json.dumps(obj, separators=(",", ":"), default=repr).encode()


def json_loads(raw: bytes | str) -> Any:
    return json.loads(raw)


class EventType(StrEnum):
    STARTED = "started"  # the worker took the job off the queue; data: worker id
    CHUNK = "chunk"  # one OpenAI chat.completion.chunk (JSON), already bearing the job id
    DONE = "done"  # stream ended; data: JSON {"final": last chunk with finish_reason, "usage"}
    RESULT = "result"  # stream=false: the whole chat.completion JSON
    ERROR = "error"  # data: JSON ServiceError.to_wire(); terminal


TERMINAL = frozenset({EventType.DONE, EventType.RESULT, EventType.ERROR})


@dataclass(frozen=True, slots=True)
class Event:
    """One pub/sub message. ``data`` stays bytes: the gateway frames chunks without decoding."""

    seq: int
    type: EventType
    data: bytes

    def encode(self) -> bytes:
        return b"%d %s %s" % (self.seq, self.type.value.encode(), self.data)

    @staticmethod
    def decode(raw: bytes) -> Event:
        seq, kind, data = raw.split(b" ", 2)
        return Event(int(seq), EventType(kind.decode()), data)


class JobSpec(BaseModel):
    """A validated, immutable chat job: the only thing the gateway puts into Redis.

    ``body`` stays the last field: arq logs the first 80 characters of a job's arguments,
    and prompts must never reach the logs.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    stream: bool
    include_usage: bool
    enqueued_at_ms: int
    body: dict[str, Any]  # the request for the engine, unknown fields kept


class WorkerInfo(BaseModel):
    """One worker's heartbeat, stored as the hash ``llmq:worker:<id>``."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    max_active: int
    active: int
    models: tuple[str, ...]
    engine_ready: bool
    engine_url: str
    started_at: float

    def to_hash(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "max_active": str(self.max_active),
            "active": str(self.active),
            "models": json.dumps(list(self.models)),
            "engine_ready": "1" if self.engine_ready else "0",
            "engine_url": self.engine_url,
            "started_at": f"{self.started_at:.3f}",
        }

    @staticmethod
    def from_hash(raw: dict[bytes, bytes] | dict[str, str]) -> WorkerInfo:
        h = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return WorkerInfo(
            worker_id=h["worker_id"],
            max_active=int(h["max_active"]),
            active=int(h["active"]),
            models=tuple(json.loads(h["models"])),
            engine_ready=h["engine_ready"] == "1",
            engine_url=h.get("engine_url", ""),
            started_at=float(h.get("started_at", "0")),
        )
