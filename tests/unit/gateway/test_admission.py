"""Admission decisions: readiness, model routing, the bound per queue mode."""

from __future__ import annotations

import time

import pytest

from llmq.gateway.admission import Admission, admission_limit
from llmq.gateway.auth import OPEN
from llmq.gateway.registry import WorkerRegistry
from llmq.shared.errors import (
    EngineUnavailable,
    ModelNotFound,
    QueueFull,
    QueueUnavailable,
    ServerBusy,
    ServiceError,
)
from llmq.shared.protocol import JobSpec, WorkerInfo
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from tests.support.records import worker_info


def worker(wid: str, ready: bool = True, slots: int = 2, models=("m",)) -> WorkerInfo:
    return worker_info(wid, max_active=slots, models=models, engine_ready=ready)


def admission(store: Store, workers: list[WorkerInfo], **settings) -> Admission:
    s = Settings(**settings)
    reg = WorkerRegistry(store, 1, scale_to_zero=s.scale_to_zero_models)
    reg.workers = workers
    reg.redis_ok = True
    return Admission(s, store, reg)


def spec(i: int) -> JobSpec:
    return JobSpec(
        id=f"j{i}",
        model="m",
        stream=False,
        include_usage=False,
        enqueued_at_ms=int(time.time() * 1000),
        body={},
    )


def test_limit_per_mode() -> None:
    assert admission_limit(Settings(queue_mode="queue", queue_max=5), 4) == 9
    assert admission_limit(Settings(queue_mode="reject", queue_max=5), 4) == 4


def test_queue_max_per_model_overrides_queue_max() -> None:
    s = Settings(queue_mode="queue", queue_max=5, queue_max_per_model={"big": 50, "none": 0})
    assert admission_limit(s, 4, "big") == 54
    assert admission_limit(s, 4, "none") == 4
    assert admission_limit(s, 4, "other") == 9
    reject = Settings(queue_mode="reject", queue_max_per_model={"big": 50})
    assert admission_limit(reject, 4, "big") == 4, "reject mode has no queue places"


def test_capacity_and_readiness_are_per_model(store: Store) -> None:
    a = admission(store, [worker("a", models=("m",)), worker("b", ready=False, models=("b",))])
    assert a.check_ready("m") == 2
    with pytest.raises(EngineUnavailable) as exc:
        a.check_ready("b")  # known (its worker lists it), its engine not ready
    assert "`b`" in exc.value.message
    with pytest.raises(ModelNotFound):
        a.check_ready("nope")


def test_a_model_whose_workers_died_is_503_until_forgotten(store: Store) -> None:
    """llmq:models remembers what was served (MODEL_MEMORY_S): 503, not 404."""
    a = admission(store, [worker("a", models=("m",))])
    a._registry.remembered = ["m", "gone"]
    with pytest.raises(EngineUnavailable):
        a.check_ready("gone")
    a._registry.remembered = ["m"]
    with pytest.raises(ModelNotFound):
        a.check_ready("gone")


def test_aliases_resolve_to_served_models_and_count_as_known(store: Store) -> None:
    reg = WorkerRegistry(store, 1, aliases={"gpt-4o-mini": "m", "later": "unserved"})
    reg.workers = [worker("a", models=("m", "m-lora"))]
    reg.redis_ok = True
    assert reg.resolve("gpt-4o-mini") == "m"
    assert reg.resolve("m-lora") == "m-lora"
    assert reg.known("unserved"), "an alias' target is the operator's: 503 until served"
    assert reg.labelled_models() == ["m", "m-lora", "unserved"]


def test_aliases_must_name_models_not_aliases() -> None:
    with pytest.raises(ValueError, match="names an alias"):
        Settings(model_aliases={"a": "b", "b": "m"})
    with pytest.raises(ValueError, match="another"):
        Settings(model_aliases={"a": "a"})


def test_capacity_counts_only_ready_workers_serving_the_model(store: Store) -> None:
    a = admission(
        store,
        [
            worker("a"),
            worker("b", ready=False),
            worker("c", slots=3),
            worker("d", models=("other",)),
        ],
    )
    assert a.check_ready("m") == 5


def test_unreachable_redis_is_503_queue_unavailable(store: Store) -> None:
    a = admission(store, [worker("a")])
    a._registry.redis_ok = False
    with pytest.raises(QueueUnavailable):
        a.check_ready("m")


def test_no_ready_engine_is_503_unknown_model_is_404(store: Store) -> None:
    with pytest.raises(EngineUnavailable):
        admission(store, []).check_ready("m")
    with pytest.raises(EngineUnavailable):
        admission(store, [worker("a", ready=False)]).check_ready("m")
    with pytest.raises(ModelNotFound):
        admission(store, [worker("a")]).check_ready("nope")


async def test_a_scale_to_zero_model_without_workers_queues_in_its_places(store: Store) -> None:
    """No worker, never seen: known all the same, and admitted into its queue places (the
    queue signal wakes the autoscaler); past them, queue_full. Other models are unchanged."""
    a = admission(
        store, [], scale_to_zero_models="cold, m2", queue_max=5, queue_max_per_model={"cold": 2}
    )
    assert a._settings.scale_to_zero_models == ("cold", "m2")
    assert a.check_ready("cold") == 0
    assert "cold" in a._registry.labelled_models()
    cold = [spec(i).model_copy(update={"model": "cold"}) for i in range(3)]
    assert (await a.admit(cold[0], 0, OPEN)).admitted
    assert (await a.admit(cold[1], 0, OPEN)).admitted
    refused = await a.admit(cold[2], 0, OPEN)
    with pytest.raises(QueueFull):
        a.raise_unless_admitted(refused, cold[2], 0, OPEN)
    with pytest.raises(EngineUnavailable):  # a model no worker has described yet: maybe later
        a.check_ready("nope")
    with pytest.raises(EngineUnavailable):  # not a scale-to-zero model: 503 as before
        admission(store, [worker("a", ready=False, models=("warm",))]).check_ready("warm")


def test_scale_to_zero_needs_queue_places() -> None:
    with pytest.raises(ValueError, match="QUEUE_MODE=queue"):
        Settings(scale_to_zero_models="cold", queue_mode="reject")
    with pytest.raises(ValueError, match="queue places"):
        Settings(scale_to_zero_models="cold", queue_max_per_model={"cold": 0})
    assert Settings(scale_to_zero_models="").scale_to_zero_models == ()


@pytest.mark.parametrize(
    ("mode", "error", "admitted"), [("queue", QueueFull, 3), ("reject", ServerBusy, 2)]
)
async def test_bound_per_mode(store: Store, mode: str, error: type, admitted: int) -> None:
    a = admission(store, [worker("a")], queue_mode=mode, queue_max=1, retry_after_s=2)
    for i in range(admitted):
        assert (await a.admit(spec(i), 2, OPEN)).admitted
    refused = await a.admit(spec(99), 2, OPEN)
    with pytest.raises(error) as info:
        a.raise_unless_admitted(refused, spec(99), 2, OPEN)
    assert isinstance(info.value, ServiceError)
    assert info.value.headers() == {"Retry-After": "2"}
