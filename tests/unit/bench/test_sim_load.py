"""The simulator's load model: the curve, the KV budget, preemption and its recompute."""

from __future__ import annotations

import asyncio

import pytest

from bench.sim_load import LoadModel, curve_ms, parse_curve


def test_the_curve_joins_its_points_and_goes_on_past_the_last() -> None:
    points = parse_curve("8:14, 1:10,32:30")
    assert points == [(1, 10.0), (8, 14.0), (32, 30.0)]
    assert curve_ms(points, 1) == 10.0
    assert curve_ms(points, 0) == 10.0
    assert curve_ms(points, 4.5) == pytest.approx(12.0)
    assert curve_ms(points, 20) == pytest.approx(22.0)
    assert curve_ms(points, 56) == pytest.approx(46.0)
    assert curve_ms(parse_curve("1:7"), 50) == 7.0


def test_the_time_per_token_follows_the_running_batch() -> None:
    load = LoadModel("1:10,11:20", kv_tokens=0, prefill_us_per_token=0)
    seqs = [load.join(5) for _ in range(6)]
    assert all(s.admitted.is_set() for s in seqs), "no budget: nothing waits"
    assert load.itl_s(None, 0.5) == pytest.approx(0.015)
    assert load.itl_s(0.002, 0.5) == 0.002, "a request's own pace is kept"
    for s in seqs:
        load.leave(s)
    assert load.running == {}
    assert load.itl_s(None, 0.5) == pytest.approx(0.010)


def test_beyond_the_budget_the_latest_is_preempted_and_resumes_first() -> None:
    async def run() -> None:
        load = LoadModel("", kv_tokens=30, prefill_us_per_token=0)
        a, b, c = load.join(10), load.join(10), load.join(10)
        assert all(s.admitted.is_set() for s in (a, b, c))
        late = load.join(10)
        assert not late.admitted.is_set(), "its prompt does not fit: it waits"
        assert load.waiting == 1
        await load.gap(a, 0.0, 0.0)  # a's token takes the budget over: c (the latest) goes
        assert c.preempted
        assert load.preemptions == 1
        assert load.used == 21
        load.leave(b)
        assert not c.preempted, "freed cache goes to the preempted first"
        assert not late.admitted.is_set(), "and only then to new requests"
        load.leave(a)
        assert late.admitted.is_set()
        assert load.waiting == 0

    asyncio.run(run())


def test_a_stalled_request_makes_no_token_until_it_is_resumed() -> None:
    async def run() -> None:
        load = LoadModel("", kv_tokens=20, prefill_us_per_token=0)
        a, b = load.join(10), load.join(10)
        await load.gap(a, 0.0, 0.0)
        assert b.preempted
        step = asyncio.create_task(load.gap(b, 0.0, 0.0))
        await asyncio.sleep(0.01)
        assert not step.done()
        assert b.tokens == 0
        load.leave(a)
        await asyncio.wait_for(step, 1)
        assert b.tokens == 1

    asyncio.run(run())
