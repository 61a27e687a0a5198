"""What a worker's jobs share: the ``Runtime`` (settings, Redis, engine client, metrics,
outbox, what the engine said of itself), built once per process and kept in arq's ``ctx``.

Its own module so that the chat job (``job``) and the batch request (``batch``) both use it
without importing each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmq.shared.errors import WrongModelKind
from llmq.shared.protocol import JobSpec, ModelCard
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.routing import Affinity
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from llmq.worker.embeddings import Embedder
from llmq.worker.engine import EngineClient
from llmq.worker.metrics import WorkerMetrics
from llmq.worker.outbox import Outbox
from llmq.worker.slots import AdaptiveSlots

# The one key of arq's per-worker ``ctx`` dict this service uses: arq hands ``ctx`` to every
# job function, and the job finds the worker's Runtime under it.
RUNTIME = "llmq_runtime"


@dataclass
class Runtime:
    """What a job needs, built once per worker process and kept in arq's ``ctx``."""

    settings: Settings
    store: Store
    batches: BatchStore
    engine: EngineClient
    metrics: WorkerMetrics
    outbox: Outbox
    embedder: Embedder = field(init=False)  # embedding jobs into the engine, merged
    active: int = 0
    models: tuple[str, ...] = ()  # what the engine serves: the jobs this worker takes
    cards: tuple[ModelCard, ...] = ()
    max_model_len: int = 0  # the engine's context length, as /v1/models says
    engine_ready: bool = False
    auto_tools: bool | None = None  # the engine takes tool_choice "auto" (None: not known)
    # The cache-affinity result of each job picked and not yet started (its span says it):
    # job id -> (hit | miss | cold, ms it was left for a warmer worker, -1: never).
    picks: dict[str, tuple[str, int]] = field(default_factory=dict)
    # What each served model is (kind, vector length), probed once per engine start.
    kinds: dict[str, ModelCard] = field(default_factory=dict)
    affinity: Affinity | None = None  # cache-aware pickup's terms (None: PREFIX_AFFINITY off)
    # Jobs that ended while Redis was unreachable: their traces are removed once it is back.
    unreleased: dict[str, JobSpec] = field(default_factory=dict)
    # Jobs that reached this worker's job function (the engine may have seen them): never
    # returned to the queue (at most once). The most recent ENTERED_KEPT, oldest first.
    entered: dict[str, None] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    itl_s: float = 0.0  # the engine's recent time per token (EWMA of streamed jobs; 0: unknown)
    slots: AdaptiveSlots | None = None  # MAX_ACTIVE=auto: the live limit (None: fixed)
    # Migration (``queue.migration``). Picked jobs that are migrated ones: id -> their
    # migrations so far (read and removed when the job starts).
    resumed: dict[str, int] = field(default_factory=dict)
    # Jobs this worker handed over, to queue for the next worker once arq finished them.
    migrating: dict[str, JobSpec] = field(default_factory=dict)
    # Running jobs to give up, and why ("drain", "engine_stall"): their task is cancelled.
    giving_up: dict[str, str] = field(default_factory=dict)
    # Streamed jobs watched for an engine stall (ENGINE_STALL_S): id -> their watch.
    watching: dict[str, Watch] = field(default_factory=dict)
    # The engine failed a job (and its /health did): not ready until /health answers again.
    engine_suspect: bool = False

    def __post_init__(self) -> None:
        sizes = self.metrics.embed_batch if self.metrics is not None else None
        self.embedder = Embedder(self.engine, self.settings.embed_batch_max_inputs, sizes=sizes)
        s = self.settings
        if s.adaptive_slots and self.slots is None:
            self.slots = AdaptiveSlots(s.tpot_objective_ms / 1000, s.max_active)

    @property
    def capacity(self) -> int:
        """The jobs this worker runs at once now: MAX_ACTIVE, or the adaptive limit."""
        return self.slots.limit if self.slots is not None else self.settings.max_active

    def check_kind(self, spec: JobSpec) -> None:
        """A job its model's kind cannot answer (admitted while no gateway knew the kind:
        a model scaled to zero) is refused as the gateway would have (WrongModelKind)."""
        card = self.kinds.get(spec.model)
        if card is not None and card.kind is not None and not card.kind.serves(spec.api):
            raise WrongModelKind(card.kind.refusal(spec.model, spec.api), param="model")

    def stream_interval(self) -> int:
        """Tokens the engine is asked to put in one streamed delta (vLLM's
        ``stream_interval``): while this worker runs STREAM_BATCH_FROM jobs or more, as many
        as the engine makes in STREAM_FRAME_MS (at most MAX_STREAM_INTERVAL); else 1."""
        s = self.settings
        if not s.stream_frame_ms or self.active < s.stream_batch_from or self.itl_s <= 0:
            return 1
        return max(1, min(MAX_STREAM_INTERVAL, int(s.stream_frame_ms / 1000 / self.itl_s)))

    def observe_itl(self, itl_s: float) -> None:
        self.itl_s = itl_s if self.itl_s <= 0 else 0.8 * self.itl_s + 0.2 * itl_s


@dataclass
class Watch:
    """A streamed job watched for an engine stall: its task, and its event count when it
    last changed (a stream's every token is an event)."""

    task: asyncio.Task[Any]
    events: Callable[[], int]  # its publisher's events so far
    seen: int = 0
    since: float = field(default_factory=time.monotonic)


ENTERED_KEPT = 10_000
MAX_STREAM_INTERVAL = 16


def mark_entered(rt: Runtime, job_id: str) -> None:
    rt.entered[job_id] = None
    if len(rt.entered) > ENTERED_KEPT:
        del rt.entered[next(iter(rt.entered))]


def runtime_of(ctx: dict[str, Any]) -> Runtime:
    rt = ctx[RUNTIME]
    if not isinstance(rt, Runtime):  # pragma: no cover - a wiring error, not a job error
        raise TypeError(f"ctx[{RUNTIME!r}] is {type(rt).__name__}, not Runtime")
    return rt
