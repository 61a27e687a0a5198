"""``MODEL_FALLBACKS``: a request whose model cannot take it now goes to the first of the
model's fallbacks that can.

``MODEL_FALLBACKS`` maps a served model to an ordered list of others (JSON:
``{"qwen-72b": ["qwen-7b"]}``). At admission (``gateway.submission.submit``):

- **unavailable**: the model has no ready engine (every worker gone, or scaled to zero):
  its first fallback with one takes the request;
- **busy**: the model's admission refuses it for its wait (its queue is full, it would not
  start within QUEUE_TIMEOUT_S, its time-to-first-token objective cannot be met): the next
  candidate's admission is tried, each one the same atomic script, so it is exact across
  gateways;
- a fallback that does not serve the request's API (an embedding model for chat), whose
  context cannot hold the request, or that has no ready engine is skipped; a request the
  model itself refuses for what it asks (a wrong kind, too many tokens) is not sent on.

When none can take it, the client gets the model's own refusal. A job sent on is the
fallback's in every respect: its queue, its slots, its metrics' ``model`` label; the
answer's ``model`` is the fallback's (the engine names it), the header ``x-llmq-fallback``
says ``<requested> -> <served>``, and ``api_model_fallbacks_total{requested,served,reason}``
counts it. A key's limits (rpm, tpm, max_concurrent) are the key's whatever the model, and
keys have no per-model permissions, so every key may use every fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmq.shared.errors import EngineUnavailable, ModelNotFound, ServiceError
from llmq.shared.protocol import JobSpec, StoredJob
from llmq.shared.queue.jobs import AdmitStatus

FALLBACK_HEADER = "x-llmq-fallback"

# What a busy model's admission answers that another model may not: its wait.
BUSY = (AdmitStatus.FULL, AdmitStatus.WAIT, AdmitStatus.DEADLINE)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model that may take the request: the job as that model's, its capacity."""

    spec: JobSpec
    capacity: int
    record: StoredJob | None


def as_model(spec: JobSpec, model: str) -> JobSpec:
    """The job as another model's (the engine request names it too)."""
    if model == spec.model:
        return spec
    return spec.model_copy(update={"model": model, "body": {**spec.body, "model": model}})


def candidates(
    spec: JobSpec,
    fallbacks: tuple[str, ...],
    record: StoredJob | None,
    check: Callable[[JobSpec], int],
) -> list[Candidate]:
    """The request's model, then its fallbacks, each that can take it now (``check``: its
    capacity, or the refusal that the model cannot serve it). The model itself comes last
    when it has no slot (scaled to zero: its request would wait for a worker to start).
    None can: the model's own refusal."""
    out: list[Candidate] = []
    cold: list[Candidate] = []
    refusal: ServiceError | None = None
    for model in (spec.model, *fallbacks):
        job = as_model(spec, model)
        try:
            capacity = check(job)
        except (EngineUnavailable, ModelNotFound) as exc:
            if model == spec.model:  # its fallbacks may take it; else this is the answer
                refusal = exc
            continue
        except ServiceError:
            if model == spec.model:
                raise  # what the request asks for is refused: no other model is tried
            continue
        kept = record.model_copy(update={"model": model}) if record is not None else None
        (cold if capacity == 0 and fallbacks else out).append(Candidate(job, capacity, kept))
    out += cold
    if not out:
        raise refusal or EngineUnavailable(f"no model can take `{spec.model}`'s request now")
    return out
