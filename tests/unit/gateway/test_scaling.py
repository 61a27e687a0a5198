"""The scaling signal's formula (gateway.scaling) and the drain rate it reads."""

from __future__ import annotations

import pytest

from llmq.gateway.scaling import DrainRates, desired_workers


def want(running: int, waiting: int, drain: float, slots: float = 8, target: float = 10) -> int:
    return desired_workers(
        running=running,
        waiting=waiting,
        drain_per_s=drain,
        slots_per_worker=slots,
        target_wait_s=target,
    )


def test_no_load_needs_no_worker() -> None:
    assert want(0, 0, 0.0) == 0
    assert want(0, 0, 5.0) == 0


def test_without_a_drain_rate_every_job_needs_a_slot() -> None:
    assert want(0, 1, 0.0) == 1, "a model scaled to zero with one waiting job gets a worker"
    assert want(8, 0, 0.0) == 1
    assert want(8, 1, 0.0) == 2
    assert want(16, 16, 0.0) == 4


def test_fast_turnover_serves_the_queue_from_fewer_slots() -> None:
    """8 running jobs end 4 per second: one slot ends 0.5 jobs/s, 5 jobs in the 10 s target;
    40 waiting jobs need 8 more slots: 16 slots, 2 workers of 8."""
    assert want(8, 40, 4.0) == 2
    assert want(8, 41, 4.0) == 3
    # Jobs longer than the target: a slot serves at most one of them in time.
    assert want(8, 40, 0.1) == 6


@pytest.mark.parametrize(("slots", "expected"), [(1, 12), (4, 3), (12, 1), (0, 12)])
def test_workers_are_the_slots_needed_over_each_workers_slots(slots: int, expected: int) -> None:
    assert want(4, 8, 0.0, slots=slots) == expected


def test_drain_rate_is_the_counters_rate_smoothed() -> None:
    rates = DrainRates()
    assert rates.update("m", 100, now=0.0) == 0.0, "one reading: no rate yet"
    assert rates.update("m", 110, now=1.0) == pytest.approx(10.0)
    assert rates.update("m", 110, now=2.0) == pytest.approx(7.0)  # 10 + 0.3 * (0 - 10)
    assert rates.update("m", 5, now=3.0) == pytest.approx(7.0), "a reset counter is skipped"
    rates.forget({"other"})
    assert rates.rates == {}
