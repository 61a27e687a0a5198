"""The messages that cross Redis: job and worker records, the event wire format.

Key and channel names are ``shared.queue.names``'s.

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

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

JOB_FUNCTION = "chat"
OUTCOME_TTL_S = 300
OUTCOME_TTL_MS = OUTCOME_TTL_S * 1000


class Outcome(StrEnum):
    """How a job ended: ``worker_jobs_total{outcome}``, ``llmq:outcome:<id>``, the job's log
    line, and what a stored job's status becomes (``StoredStatus.after``)."""

    COMPLETED = "completed"
    REJECTED = "rejected"  # the engine answered 4xx
    ENGINE_ERROR = "engine_error"  # 5xx, or its stream broke
    TIMEOUT = "timeout"  # REQUEST_TIMEOUT_S
    CLIENT_GONE = "client_gone"  # nobody listened for ORPHAN_GRACE_S
    CANCELLED = "cancelled"  # aborted (a client's cancel or disconnect), or the worker stopped
    ERROR = "error"  # a bug in the worker
    REDIS_ERROR = "redis_error"  # its events could not be delivered
    WORKER_LOST = "worker_lost"  # its worker died (set by the reaper)
    DISPLACED = "displaced"  # never started: its place went to a key holding fewer (admit)
    DEADLINE = "deadline"  # never started: its time-to-first-token deadline passed (dropped)
    UNDECRYPTABLE = "payload_undecryptable"  # no key of PAYLOAD_KEYS opens its body
    MIGRATED = "migrated"  # handed over to another worker (its engine failed, or a drain)


def outcome_record(outcome: Outcome, worker_id: str = "") -> str:
    """What is kept of a job once it ended (OUTCOME_TTL_S): no prompt, no completion."""
    return json.dumps({"outcome": outcome, "worker": worker_id}, separators=(",", ":"))


class Api(StrEnum):
    """The API a job answers (``JobSpec.api``): what its worker asks the engine and what
    shape its answer takes."""

    CHAT = "chat"  # /v1/chat/completions
    RESPONSES = "responses"  # /v1/responses: a chat job answered as a response
    COMPLETIONS = "completions"  # /v1/completions (legacy text completions)
    EMBEDDINGS = "embeddings"  # /v1/embeddings

    @property
    def path(self) -> str:
        """The route that answers it (the gateway's and the engine's)."""
        return "/v1/chat/completions" if self is Api.CHAT else f"/v1/{self.value}"


class ModelKind(StrEnum):
    """What a served model does, as its engine answers (``worker.engine.EngineClient.kind``):
    vLLM's generate runner serves chat and completions, its pooling runner embeddings, and
    neither serves the other's routes (a bare 404)."""

    GENERATE = "generate"
    EMBED = "embed"

    def serves(self, api: Api) -> bool:
        return (api is Api.EMBEDDINGS) == (self is ModelKind.EMBED)

    def refusal(self, model: str, api: Api) -> str:
        """Why ``model`` of this kind cannot answer ``api`` (gateway and worker say it)."""
        if self is ModelKind.EMBED:
            what, serves = "an embedding model", "/v1/embeddings only"
        else:
            what, serves = "a generative model", "chat, Responses and completions, not embeddings"
        return f"`{model}` is {what}: it serves {serves}, so {api.path} cannot use it"


class StoredStatus(StrEnum):
    """A stored job's ``status`` (the Responses API's words)."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @staticmethod
    def after(outcome: Outcome) -> StoredStatus:
        """The status a job's worker outcome leaves."""
        if outcome is Outcome.COMPLETED:
            return StoredStatus.COMPLETED
        if outcome in (Outcome.CANCELLED, Outcome.CLIENT_GONE):
            return StoredStatus.CANCELLED
        return StoredStatus.FAILED


OUT_OF_BAND = 0  # sequence number of a terminal event not sent by the job's worker

ANONYMOUS = "anonymous"  # the tenant of every request when AUTH=none


class Band(StrEnum):
    """Priority bands, highest first: a worker with a free slot serves the highest band
    that has a waiting job."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    def lowered_to(self, other: Band) -> Band:
        """The lower of the two bands (a request may lower its key's band, never raise)."""
        order = list(Band)
        return order[max(order.index(self), order.index(other))]


BANDS = tuple(b.value for b in Band)


# The longest time-to-first-token objective a request or key may name (a day).
MAX_OBJECTIVE_MS = 86_400_000


class KeyLimits(BaseModel):
    """Limits given on the command line: None keeps the current value (0 = unlimited)."""

    max_concurrent: int | None = Field(None, ge=0)
    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    priority: Band | None = None
    ttft_objective_ms: int | None = Field(None, ge=0, le=MAX_OBJECTIVE_MS)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ApiKey(BaseModel):
    """One API key as stored (``llmq:apikey:<digest>``); the secret is never stored."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    digest: str
    max_concurrent: int = 0
    rpm: int = 0
    tpm: int = 0
    priority: Band = Band.NORMAL
    created_at: float = 0.0
    # Its requests' default time-to-first-token objective (0: none; a request's
    # X-TTFT-Objective-Ms comes first, TTFT_OBJECTIVE_MS of its band after).
    ttft_objective_ms: int = 0

    def to_hash(self) -> dict[str, str]:
        return {k: str(v.value if isinstance(v, Band) else v) for k, v in self}

    @staticmethod
    def from_hash(raw: dict[bytes, bytes]) -> ApiKey:
        return ApiKey.model_validate({k.decode(): v.decode() for k, v in raw.items()})


def json_dumps(obj: Any) -> bytes:
    """arq's job/result serializer: JSON, never pickle. Exceptions become their repr."""
    return json.dumps(obj, separators=(",", ":"), default=repr).encode()


def json_loads(raw: bytes | str) -> Any:
    return json.loads(raw)


class EventType(StrEnum):
    STARTED = "started"  # the worker took the job off the queue; data: worker id
    CHUNK = "chunk"  # one OpenAI chat.completion.chunk (JSON), already bearing the job id
    DONE = "done"  # stream ended; data: JSON {"final": last chunk with finish_reason, "usage"}
    RESULT = "result"  # stream=false: the whole answer (chat.completion, embeddings list) JSON
    ERROR = "error"  # data: JSON ServiceError.to_wire(); terminal


TERMINAL = frozenset({EventType.DONE, EventType.RESULT, EventType.ERROR})


_TYPES = {t.value.encode(): t for t in EventType}


@dataclass(frozen=True, slots=True)
class Event:
    """One job event: ``<seq> <type> <data>``. ``data`` stays bytes (the gateway frames
    chunks without decoding) and never holds a newline: one pub/sub message carries one or
    more events separated by ``\n`` (the worker coalesces a job's events that are ready at
    the same moment; at low load each message is one event)."""

    seq: int
    type: EventType
    data: bytes

    def encode(self) -> bytes:
        return b"%d %s %s" % (self.seq, self.type.value.encode(), self.data)

    @staticmethod
    def decode(raw: bytes) -> Event:
        seq, kind, data = raw.split(b" ", 2)
        event_type = _TYPES.get(kind)
        if event_type is None:
            raise ValueError(f"unknown event type {kind[:20]!r}")
        return Event(int(seq), event_type, data)

    @staticmethod
    def decode_message(message: bytes) -> list[Event]:
        """The events of one pub/sub message, in order."""
        return [Event.decode(line) for line in message.split(b"\n")]


def encode_message(events: list[bytes]) -> bytes:
    """Encoded events of one job -> one pub/sub message."""
    return b"\n".join(events)


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
    tenant: str = ANONYMOUS  # the API key's name
    band: Band = Band.NORMAL
    tpm: int = 0  # the tenant's tokens-per-minute limit (the worker corrects the bucket)
    token_estimate: int = 0  # tokens taken from the tenant's bucket at admission
    # Its time-to-first-token objective (ms; 0: none): it is due at admission + this, is
    # ordered by that among its key's waiting jobs, and is dropped when it passes unstarted,
    # unless ``best_effort`` (X-Deadline-Policy: best-effort: ordered, never refused).
    ttft_objective_ms: int = 0
    best_effort: bool = False
    # A stored job: its events logged (llmq:log:<id>), it outlives its client (the request's
    # ``store``, or an Idempotency-Key). Read as "store" too: payloads queued by an older
    # gateway during an upgrade.
    stored: bool = Field(False, validation_alias=AliasChoices("stored", "store"))
    api: Api = Api.CHAT  # the API that answers it
    # Nobody listens when it starts (a background response): its worker does not wait for
    # a subscriber to hear STARTED (its events are logged; a follower reads the log).
    background: bool = False
    # The W3C trace context of the request that made it (``traceparent``, ``tracestate``;
    # empty when tracing is off): the worker's span joins the request's trace.
    trace: dict[str, str] = Field(default_factory=dict)
    batch_id: str = ""  # a batch request: its result goes to the batch, not to a client
    batch_index: int = -1  # its line in the batch's input file
    custom_id: str = ""
    # The body sealed (``shared.sealing``): in Redis ``body`` is {} and this holds it,
    # and ``body_bytes`` its size (what operators see of it).
    sealed: str = ""
    body_bytes: int = 0
    body: dict[str, Any]  # the request for the engine, allowed pass-through fields kept


class StoredJob(BaseModel):
    """A stored job's record (``llmq:stored:<id>``): who may read it and where it stands."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    band: Band
    model: str
    stream: bool
    include_usage: bool
    enqueued_at_ms: int
    status: StoredStatus = StoredStatus.QUEUED
    api: Api = Api.CHAT  # responses: a stored response (GET /v1/responses/{id})
    body_digest: str = ""  # the Idempotency-Key's body check
    metadata: dict[str, str] = Field(default_factory=dict)  # OpenAI's, for listing
    trace: dict[str, str] = Field(default_factory=dict)  # its request's trace (a resume links it)

    def to_hash(self) -> dict[str, str]:
        return {
            k: json.dumps(v) if isinstance(v, dict) else str(int(v) if isinstance(v, bool) else v)
            for k, v in self
        }

    @staticmethod
    def from_hash(raw: dict[bytes, bytes]) -> StoredJob:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        fields["metadata"] = json.loads(fields.get("metadata") or "{}")
        fields["trace"] = json.loads(fields.get("trace") or "{}")
        return StoredJob.model_validate(fields)

    @staticmethod
    def of(
        spec: JobSpec, body_digest: str = "", metadata: dict[str, str] | None = None
    ) -> StoredJob:
        fields = spec.model_dump(include=set(StoredJob.model_fields))
        return StoredJob(**fields, body_digest=body_digest, metadata=metadata or {})

    def spec(self) -> JobSpec:
        """The job as far as cancelling it goes (no body: the prompt is not kept here)."""
        fields = self.model_dump(exclude={"status", "body_digest", "metadata"})
        return JobSpec(**fields, stored=True, body={})


def worker_job_owner(raw: bytes | str) -> tuple[str, str]:
    """(tenant, model) of a running job's entry in ``llmq:worker-jobs:<id>`` (JSON [tenant,
    model, band]; [tenant, model] or a bare tenant from an older worker: model "")."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        tenant, model, *_ = json.loads(text)
        return str(tenant), str(model)
    except (ValueError, TypeError):
        return text, ""


class ModelCard(BaseModel):
    """One model as its engine's ``/v1/models`` lists it: a base model, an extra served name
    or a LoRA adapter (``parent``: the model it adapts, as vLLM reports it), and what its
    engine's answers told of it: its kind, and for an embedding model the length of its
    vectors and whether it takes ``dimensions`` (a Matryoshka model)."""

    model_config = ConfigDict(frozen=True)

    id: str
    owned_by: str = ""
    parent: str | None = None
    max_model_len: int = 0  # 0: not said
    kind: ModelKind | None = None  # None: not probed yet
    dimensions: int = 0  # an embedding model's vector length (0: not known)
    matryoshka: bool = False  # it takes ``dimensions`` (shorter vectors)

    @staticmethod
    def from_engine(entry: dict[str, Any]) -> ModelCard:
        return ModelCard(
            id=str(entry["id"]),
            owned_by=str(entry.get("owned_by") or ""),
            parent=entry.get("parent") or None,
            max_model_len=int(entry.get("max_model_len") or 0),
        )


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
    max_model_len: int = 0  # the engine's context length (0: not known)
    # Whether the engine takes tools with tool_choice "auto" (None: not known yet).
    auto_tools: bool | None = None
    cards: tuple[ModelCard, ...] = ()  # what the engine says of each of ``models``

    def to_hash(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "max_active": str(self.max_active),
            "active": str(self.active),
            "models": json.dumps(list(self.models)),
            "engine_ready": "1" if self.engine_ready else "0",
            "engine_url": self.engine_url,
            "started_at": f"{self.started_at:.3f}",
            "max_model_len": str(self.max_model_len),
            "auto_tools": {None: "", True: "1", False: "0"}[self.auto_tools],
            "cards": json.dumps([c.model_dump(exclude_defaults=True) for c in self.cards]),
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
            max_model_len=int(h.get("max_model_len", "0")),
            auto_tools={"1": True, "0": False}.get(h.get("auto_tools", "")),
            cards=tuple(ModelCard(**c) for c in json.loads(h.get("cards") or "[]")),
        )
