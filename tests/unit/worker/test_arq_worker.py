"""The arq seam: a tripwire on every arq member the worker relies on, and its wake-ups.

No ``from __future__ import annotations`` here: the stand-ins for arq's methods below must
have signatures that print exactly as arq's do.
"""

import asyncio
import functools
import inspect
from pathlib import Path
from typing import Any

import pytest
from arq.worker import Worker

from llmq.shared.queue.routing import Affinity, Picked, PickResult
from llmq.shared.settings import Settings
from llmq.worker import arq_worker
from llmq.worker.app import build_worker
from llmq.worker.arq_worker import ARQ_SEAM, WakeableWorker, seam_problems


@pytest.fixture
async def worker() -> WakeableWorker:
    # Nothing connects until the worker runs: building it needs no Redis.
    return build_worker(Settings(wake_fallback_s=30), handle_signals=False)


async def test_installed_arq_matches_every_pinned_member(worker: WakeableWorker) -> None:
    assert seam_problems(Worker, worker) == []


async def test_every_override_of_arq_is_pinned() -> None:
    ours = {
        name
        for name, member in vars(WakeableWorker).items()
        if callable(member) and hasattr(Worker, name)
    }
    assert ours <= set(ARQ_SEAM), f"overrides not pinned: {ours - set(ARQ_SEAM)}"


def _arq_with(**changes: Any) -> type:
    """A copy of arq's Worker class with members renamed, replaced or removed (None)."""
    members = dict(vars(Worker))
    for name, value in changes.items():
        if value is None:
            members.pop(name)
        else:
            members[name] = value
    return type("ChangedWorker", Worker.__bases__, members)


def test_tripwire_fires_when_arq_renames_a_member() -> None:
    renamed = dict(vars(Worker))
    hook = renamed.pop("_release_sem_dec_counter_on_complete")
    renamed["_release_slot"] = hook
    changed = type("RenamedWorker", Worker.__bases__, renamed)
    problems = seam_problems(changed)
    assert problems == [
        "method '_release_sem_dec_counter_on_complete' is gone "
        "(overridden: a freed slot wakes the loop)"
    ]


def test_tripwire_fires_when_arq_changes_a_signature_or_a_body() -> None:
    async def start_jobs(self: Worker, job_ids: list[bytes], limit: int = 0) -> None: ...

    async def _poll_iteration(self) -> None:  # same signature
        await self.heart_beat()  # new behaviour

    assert "start_jobs" in seam_problems(_arq_with(start_jobs=start_jobs))[0]
    problems = seam_problems(_arq_with(_poll_iteration=_poll_iteration))
    assert problems == [
        "arq's _poll_iteration changed (overridden: ours must do what arq's does, apart "
        "from picking jobs): review, then re-pin its hash"
    ]


def test_tripwire_fires_when_an_attribute_or_keyword_is_gone(worker: WakeableWorker) -> None:
    class Instance:
        pass

    shell = Instance()
    for name in ARQ_SEAM:
        if hasattr(worker, name) and name != "job_counter":
            setattr(shell, name, getattr(worker, name))
    assert seam_problems(Worker, shell) == ["attribute 'job_counter' is gone"]

    def init(self: Worker, functions: Any, queue_name: str) -> None: ...

    assert "__init__ lost keyword 'max_jobs'" in seam_problems(_arq_with(__init__=init))


def test_build_refuses_an_incompatible_arq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "llmq.worker.app.seam_problems", lambda cls, check_source: ["method 'x' is gone"]
    )
    with pytest.raises(RuntimeError, match="incompatible arq version: method 'x' is gone"):
        build_worker(Settings(), handle_signals=False)


async def test_a_freed_slot_wakes_the_loop(worker: WakeableWorker) -> None:
    worker._wake_event.clear()
    worker.job_counter = 1
    await worker.sem.acquire()
    worker._release_sem_dec_counter_on_complete()  # what arq calls when a job task ends
    assert worker.job_counter == 0
    assert worker._wake_event.is_set()


async def test_poll_iteration_waits_for_a_wake_up_not_the_fallback(
    worker: WakeableWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    picked: list[int] = []

    async def pick(
        models: tuple[str, ...],
        limit: int,
        in_progress_s: float,
        worker_id: str = "",
        affinity: Affinity | None = None,
    ) -> PickResult:
        picked.append(limit)
        return PickResult()

    async def nothing() -> None:
        return None

    async def no_claims(worker_id: str, running: list[str], min_age_s: float) -> int:
        return 0

    worker.runtime.engine_ready = True  # (a worker whose engine is not ready picks nothing)
    monkeypatch.setattr(worker.runtime.store.routing, "pick", pick)
    monkeypatch.setattr(worker.runtime.store.workers, "requeue_claims", no_claims)
    monkeypatch.setattr(worker, "_cancel_aborted_jobs", nothing)
    monkeypatch.setattr(worker, "heart_beat", nothing)
    worker._wake_event.clear()
    iteration = asyncio.create_task(worker._poll_iteration())
    await asyncio.sleep(0)
    assert not iteration.done(), "without a wake-up it waits (fallback: 30 s)"
    worker.wake()
    await asyncio.wait_for(iteration, 5)
    assert picked == [worker.max_jobs], "asks for as many jobs as there are free slots"


async def test_a_pick_counts_affinity_and_looks_again_when_a_left_jobs_wait_runs_out(
    worker: WakeableWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A picked job that had been left 40 ms counts as a miss and in the wait histogram;
    the pick left another job, so the loop is woken once its wait runs out."""
    started: list[list[tuple[str, int]]] = []

    async def pick(*args: Any, **kwargs: Any) -> PickResult:
        return PickResult([Picked("j1", 1, held=2, best=3, left_ms=40)], retry_ms=30)

    async def start(picked: list[tuple[str, int]]) -> None:
        started.append(picked)

    monkeypatch.setattr(worker.runtime.store.routing, "pick", pick)
    monkeypatch.setattr(worker, "_start_claimed", start)
    worker.runtime.models = ("m",)
    worker._wake_event.clear()
    assert await worker._pick(2) == 1
    assert started == [[("j1", 1)]]
    m = worker.runtime.metrics
    assert m.affinity.labels("miss")._value.get() == 1
    assert m.affinity_wait._sum.get() == pytest.approx(0.04)
    await asyncio.wait_for(worker._wake_event.wait(), 5)


def test_only_the_seam_module_subclasses_arq() -> None:
    package = Path(inspect.getfile(arq_worker)).parents[1]
    subclassing = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "(Worker)" in path.read_text()
    ]
    assert subclassing == ["worker/arq_worker.py"]


async def test_a_wake_up_for_a_model_wakes_only_the_workers_serving_it(
    worker: WakeableWorker,
) -> None:
    from llmq.worker.heartbeat import _on_wake

    rt = worker.runtime
    rt.models = ("alpha", "alpha-lora")
    woken: list[str] = []

    def msg(data: bytes, kind: str = "message") -> dict[str, object]:
        return {"type": kind, "data": data}

    for data in (b"model:alpha", b"model:alpha-lora", b"model:beta", b"chatcmpl-1", b"batch"):
        _on_wake(rt, msg(data), functools.partial(woken.append, data.decode()))
    _on_wake(rt, msg(b"1", "subscribe"), functools.partial(woken.append, "subscribe"))
    assert woken == ["model:alpha", "model:alpha-lora", "chatcmpl-1", "batch"]
