"""Sentinel failover on real processes: two redis-servers and three sentinels on loopback
(``bench.ha``), a worker and a gateway that find the primary through the sentinels. The
primary is killed (-9) under load; nothing is restarted but Redis itself."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.clients import body
from tests.support.stack import (
    Answer,
    HaRedis,
    Proc,
    Stack,
    dump_logs_on_failure,
    load_through_failover,
    start_ha_redis,
    wait_for,
)

pytestmark = pytest.mark.chaos

BOUND_S = 60  # generous for a loaded 2-core machine; bench.failover reports real figures


@pytest.fixture
def ha(logdir: Path) -> Iterator[HaRedis]:
    topology = start_ha_redis(logdir)
    yield topology
    topology.close()


@pytest.fixture
def ha_stack(
    ha: HaRedis, sim: Proc, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    httpx.post(sim.url + "/sim/reset")
    s = Stack("redis://127.0.0.1:1/0", sim.url, logdir)
    s.worker_settings = {"redis_sentinels": ha.sentinels_setting, "heartbeat_interval_s": 0.5}
    try:
        yield s
    finally:
        s.close()
        dump_logs_on_failure(request, s.procs + ha.sentinels + list(ha.servers.values()))


def test_killing_the_primary_fails_over_without_restarting_anything(
    ha: HaRedis, ha_stack: Stack
) -> None:
    """A new primary is elected; the worker and the gateway follow it by themselves;
    requests after the failover succeed; every request gets an answer (200, or a 503 while
    Redis is away), none hangs."""
    worker = ha_stack.worker(max_active=4)
    gw = ha_stack.gateway(redis_sentinels=ha.sentinels_setting)
    answers, killed = asyncio.run(load_through_failover(gw, ha, lanes=4, after_s=2.0))
    new = ha.primary_port()
    assert new is not None
    assert new != killed
    after = [a for a in answers if a.sent > 0]
    assert any(a.status == 200 and a.done and not a.code for a in after), Counter(
        (a.status, a.code) for a in after
    )
    assert all(a.took < BOUND_S for a in answers)
    outcomes = Counter((a.status, a.code) for a in answers)
    allowed = {(200, ""), (503, "queue_unavailable"), (503, "queue_timeout"),
               (200, "queue_unavailable"), (503, "engine_unavailable")}  # fmt: skip
    assert set(outcomes) <= allowed, outcomes
    assert worker.alive(), worker.output()[-2000:]
    assert gw.alive(), gw.output()[-2000:]
    final = httpx.post(gw.url + "/v1/chat/completions", json=body(stream=False), timeout=30)
    assert final.status_code == 200

    def metric(name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(lines[0].split()[1]) if lines else -1.0

    wait_for(lambda: metric("api_redis_primary_changes_total") == 1.0, 10, "the failover counted")
    assert metric("api_redis_replicas") == 0.0, "its only replica is the new primary"


def test_with_a_replica_ack_every_admitted_job_completes_or_its_client_is_told(
    ha: HaRedis, ha_stack: Stack
) -> None:
    """REDIS_MIN_REPLICAS_ACK=1: a job is admitted only once a replica has it, so the
    failover loses none: no request ends in queue_timeout (its job vanished), every one
    ends with its answer or an error. The killed server comes back as a replica, and
    admissions, refused (503) while the new primary had none, succeed again."""
    worker = ha_stack.worker(max_active=4)
    gw = ha_stack.gateway(
        redis_sentinels=ha.sentinels_setting, redis_min_replicas_ack=1, queue_timeout_s=20
    )

    async def scenario() -> tuple[list[Answer], int]:
        killed = asyncio.Event()
        load = asyncio.create_task(
            load_through_failover(gw, ha, lanes=4, after_s=2.0, on_kill=killed)
        )
        await killed.wait()
        old = ha.killed[0]
        await asyncio.to_thread(ha.wait_new_primary, old)
        await asyncio.to_thread(ha.restart, old)
        return await load

    answers, _ = asyncio.run(scenario())
    outcomes = Counter((a.status, a.code) for a in answers)
    assert (503, "queue_timeout") not in outcomes, outcomes
    assert all(a.took < BOUND_S for a in answers)
    for a in answers:
        assert (a.status == 200 and (a.done or a.code)) or (a.status != 200 and a.code), a
    assert any(a.sent > 0 and a.status == 200 and not a.code for a in answers), outcomes
    assert worker.alive(), worker.output()[-2000:]
    assert gw.alive(), gw.output()[-2000:]
