"""Each model's load and the scaling signal an autoscaler reads (``api_model_desired_workers``).

The signal, for one model:

    slots needed = running + waiting / max(1, μ·T)
    desired workers = ceil(slots needed / slots per worker)   (0 when nothing runs or waits)

``running``: its jobs started and not ended; ``waiting``: its jobs in the queue; μ: the jobs
one busy slot ends per second (the drain rate, jobs/s over every worker, divided by the
running jobs); T: SCALE_TARGET_WAIT_S, the longest a waiting job should wait. In T seconds
one slot ends μ·T jobs, so the queue is served within T by waiting / (μ·T) more slots; a
slot never serves less than one job in that time (jobs longer than T: one slot per waiting
job). Before any job of the model ended (μ unknown), every waiting job counts for a slot.
``slots per worker``: the mean MAX_ACTIVE of the model's live workers, else the
gateway's own MAX_ACTIVE (a model scaled to zero has none to ask).

Every gateway computes it from Redis' counters, so replicas agree (read with ``max``). A
model with batch lines to feed wants at least one worker. ``ScalingSignal.rows`` computes
every model's gauge row from one reading of the queue (``Readings.load``), the registry's
view of the workers and the batches' demand; ``gateway/app.py`` only reads and exports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmq.shared.queue.readings import ModelLoad

if TYPE_CHECKING:
    from llmq.gateway.registry import WorkerRegistry

# Weight of the newest sample in the smoothed drain rate (per gauge refresh).
_EWMA_ALPHA = 0.3


def desired_workers(
    *,
    running: int,
    waiting: int,
    drain_per_s: float,
    slots_per_worker: float,
    target_wait_s: float,
) -> int:
    """Workers a model needs for ``running`` + ``waiting`` jobs (see the module docstring)."""
    if running + waiting <= 0:
        return 0
    per_slot = drain_per_s / running if running > 0 and drain_per_s > 0 else 0.0
    served_per_slot = max(1.0, per_slot * target_wait_s)
    slots = running + waiting / served_per_slot
    return max(1, math.ceil(slots / max(1.0, slots_per_worker) - 1e-9))


@dataclass(frozen=True, slots=True)
class ModelRow:
    """One model's line of the per-model gauges."""

    load: ModelLoad
    capacity: int
    workers: int
    drain_per_s: float
    desired_workers: int


class DrainRates:
    """Each model's drain rate, from its ``done`` counter between two readings, smoothed."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float]] = {}  # model -> (done, monotonic time)
        self.rates: dict[str, float] = {}

    def update(self, model: str, done: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        last = self._last.get(model)
        self._last[model] = (done, now)
        if last is None or now <= last[1] or done < last[0]:  # first reading, or reset
            return self.rates.get(model, 0.0)
        sample = (done - last[0]) / (now - last[1])
        rate = self.rates.get(model)
        self.rates[model] = sample if rate is None else rate + _EWMA_ALPHA * (sample - rate)
        return self.rates[model]

    def forget(self, keep: set[str]) -> None:
        for model in set(self._last) - keep:
            del self._last[model]
            self.rates.pop(model, None)


class ScalingSignal:
    """Each model's row of the per-model gauges, its scaling signal included; keeps the drain
    rates between readings."""

    def __init__(self, target_wait_s: float, default_slots: int) -> None:
        """``target_wait_s``: SCALE_TARGET_WAIT_S; ``default_slots``: the gateway's
        MAX_ACTIVE, the slots per worker of a model with none live."""
        self.target_wait_s, self.default_slots = target_wait_s, default_slots
        self.drains = DrainRates()

    def rows(
        self,
        loads: dict[str, ModelLoad],
        registry: WorkerRegistry,
        batch_demand: Collection[str] = (),
    ) -> dict[str, ModelRow]:
        """One row per model of ``loads``; ``batch_demand``: models with batch lines to feed."""
        rows = {}
        for model, load in loads.items():
            ready = registry.ready(model)
            capacity = registry.capacity(model)
            drain = self.drains.update(model, load.done)
            slots = capacity / len(ready) if ready else self.default_slots
            desired = desired_workers(
                running=load.running,
                waiting=load.waiting,
                drain_per_s=drain,
                slots_per_worker=slots,
                target_wait_s=self.target_wait_s,
            )
            if model in batch_demand:  # lines to feed: at least one worker to feed them
                desired = max(desired, 1)
            rows[model] = ModelRow(load, capacity, len(ready), drain, desired)
        self.drains.forget(set(rows))
        return rows
