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
from llmq.shared.settings import Settings
from llmq.shared.store import Store
from tests.support.records import worker_info


def worker(wid: str, ready: bool = True, slots: int = 2, models=("m",)) -> WorkerInfo:
    return worker_info(wid, max_active=slots, models=models, engine_ready=ready)


def admission(store: Store, workers: list[WorkerInfo], **settings) -> Admission:
    reg = WorkerRegistry(store, 1)
    reg.workers = workers
    reg.redis_ok = True
    return Admission(Settings(**settings), store, reg)


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
