"""Which models may take a request (``gateway.fallbacks.candidates``), without processes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llmq.gateway.fallbacks import as_model, candidates
from llmq.shared.errors import (
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    ServiceError,
    WrongModelKind,
)
from llmq.shared.protocol import JobSpec
from tests.support.records import job_spec

Answers = dict[str, int | ServiceError]


def checker(answers: Answers) -> Callable[[JobSpec], int]:
    def check(job: JobSpec) -> int:
        answer = answers[job.model]
        if isinstance(answer, ServiceError):
            raise answer
        return answer

    return check


def models(spec: JobSpec, fallbacks: tuple[str, ...], answers: Answers) -> list[tuple[str, int]]:
    return [(c.spec.model, c.capacity) for c in candidates(spec, fallbacks, None, checker(answers))]


def test_the_model_first_then_its_fallbacks_that_can_take_it() -> None:
    spec = job_spec("j", model="big", body={"model": "big", "messages": []})
    answers: Answers = {
        "big": 4, "embed": WrongModelKind("no chat"), "gone": EngineUnavailable("none"),
        "small": 8, "short": InvalidRequest("max_tokens over its context"),
    }  # fmt: skip
    assert models(spec, ("embed", "gone", "small", "short"), answers) == [("big", 4), ("small", 8)]
    answers["big"] = EngineUnavailable("none ready")
    assert models(spec, ("small",), answers) == [("small", 8)]
    answers["big"] = 0  # scaled to zero: it waits for a worker only after the ready ones
    assert models(spec, ("small",), answers) == [("small", 8), ("big", 0)]
    assert models(spec, (), answers) == [("big", 0)]


def test_what_the_request_asks_is_not_sent_on_and_nothing_ready_is_the_models_refusal() -> None:
    spec = job_spec("j", model="big", body={"model": "big"})
    with pytest.raises(InvalidRequest):
        models(spec, ("small",), {"big": InvalidRequest("too long"), "small": 8})
    with pytest.raises(EngineUnavailable):
        models(spec, ("small",), {"big": EngineUnavailable("x"), "small": EngineUnavailable("y")})
    with pytest.raises(ModelNotFound):
        models(spec, (), {"big": ModelNotFound("unknown")})
    assert models(spec, ("small",), {"big": ModelNotFound("unknown"), "small": 2}) == [
        ("small", 2)
    ], "a model with fallbacks configured is sent on even when no worker is known"


def test_a_job_as_another_models_names_it_in_its_engine_request() -> None:
    spec = job_spec("j", model="big", body={"model": "big", "max_tokens": 5})
    other = as_model(spec, "small")
    assert (other.model, other.body) == ("small", {"model": "small", "max_tokens": 5})
    assert other.id == spec.id
    assert as_model(spec, "big") is spec
