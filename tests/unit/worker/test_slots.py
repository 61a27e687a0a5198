"""MAX_ACTIVE=auto: the adaptive limit, fed windows it decides on (no clock, no engine)."""

from __future__ import annotations

import pytest

from bench.sim_load import curve_ms, parse_curve
from llmq.worker.slots import BACKOFF, HOLD_WINDOWS, MIN_TOKENS, AdaptiveSlots, preemptions

OBJECTIVE_S = 0.025


def window(slots: AdaptiveSlots, tpot_s: float, running: int, preempted: bool = False) -> int:
    """One window: ``running`` jobs, each delta a token ``tpot_s`` apart."""
    for _ in range(MIN_TOKENS * 2):
        slots.sample(tpot_s, 1, running)
    return slots.adjust(preempted)


def test_it_doubles_while_saturated_and_fast_then_adds_one() -> None:
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=64, start=4)
    assert window(slots, 0.010, running=4) == 8
    assert window(slots, 0.010, running=8) == 16
    assert window(slots, 0.030, running=16) == 13  # 16 x 25 / 30: what would have met it
    assert window(slots, 0.015, running=13) == 14  # after a decrease: one at a time
    assert window(slots, 0.015, running=14) == 15


def test_it_does_not_grow_when_its_slots_are_not_all_used() -> None:
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=64, start=8)
    assert window(slots, 0.005, running=3) == 8
    slots.busy(8)  # a moment with every slot taken counts
    assert slots.adjust(False) == 8, "no tokens measured: no decision"
    assert window(slots, 0.005, running=8) == 16


def test_within_the_headroom_it_holds() -> None:
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=64, start=10)
    assert window(slots, OBJECTIVE_S * 0.95, running=10) == 10


def test_a_limit_still_draining_is_cut_by_what_runs_not_by_the_same_factor_again() -> None:
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=64, start=32)
    assert window(slots, 0.040, running=32) == 20
    # 30 of the jobs it admitted still run, as slow: 30 x 25 / 40, not 20 x 25 / 40.
    assert window(slots, 0.040, running=30) == 18
    assert window(slots, 0.026, running=20) == 18


def test_a_preemption_backs_off_and_holds() -> None:
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=64, start=20)
    assert window(slots, 0.010, running=20, preempted=True) == int(20 * BACKOFF)
    for _ in range(HOLD_WINDOWS - 1):
        assert window(slots, 0.010, running=14) == 14, "held after a preemption"
    assert window(slots, 0.010, running=14) == 15, "then additive increase"


def test_bounds() -> None:
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=6, start=4)
    assert window(slots, 0.001, running=4) == 6
    assert window(slots, 0.001, running=6) == 6
    tiny = AdaptiveSlots(OBJECTIVE_S, ceiling=6, start=1)
    assert window(tiny, 1.0, running=1) == 1


def closed_loop(curve: str, kv_fits: int, windows: int = 60) -> list[int]:
    """The controller against an engine whose time per token is ``curve`` at the running
    batch and which preempts beyond ``kv_fits`` requests: the limits it went through."""
    points = parse_curve(curve)
    slots = AdaptiveSlots(OBJECTIVE_S, ceiling=64)
    seen = []
    for _ in range(windows):
        running = slots.limit  # a backlog: every slot is used
        seen.append(window(slots, curve_ms(points, running) / 1000, running, running > kv_fits))
    return seen


def throughput(points: list[tuple[float, float]], n: int) -> float:
    return n / curve_ms(points, n)


@pytest.mark.parametrize("curve", ["1:5,40:45", "1:10,8:14,32:30", "1:2,16:20,64:120"])
def test_it_settles_within_ten_percent_of_the_best_fixed_value(curve: str) -> None:
    points = parse_curve(curve)
    best = max((n for n in range(1, 65) if curve_ms(points, n) <= OBJECTIVE_S * 1000), default=1)
    settled = closed_loop(curve, kv_fits=1000)[-20:]
    for limit in settled:
        assert curve_ms(points, limit) <= OBJECTIVE_S * 1000, "time per token kept"
        assert throughput(points, limit) >= 0.9 * throughput(points, best), (limit, best)


def test_it_backs_off_below_what_the_kv_cache_holds() -> None:
    settled = closed_loop("1:5,40:45", kv_fits=8)[-20:]
    assert max(settled) <= 9
    assert min(settled) >= int(8 * BACKOFF) - 1


def test_preemptions_are_read_from_vllm_metrics() -> None:
    text = (
        "# HELP vllm:num_preemptions_total Cumulative number of preemption\n"
        "# TYPE vllm:num_preemptions_total counter\n"
        'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
        'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0\n'
        'vllm:num_requests_running{model_name="m"} 4.0\n'
    )
    assert preemptions(text) == 5.0
    assert preemptions("vllm:num_requests_running 1\n") is None
