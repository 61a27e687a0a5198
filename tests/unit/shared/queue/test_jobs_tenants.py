"""Tenants in the Redis contract (fakeredis and a real redis-server): per-key limits in the
admit script, token buckets corrected at release, priority bands and fair picking."""

from __future__ import annotations

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.jobs import AdmitStatus, TenantLimits
from llmq.shared.queue.store import Store
from tests.support.records import job_spec, worker_info

HIGH, NORMAL, LOW = p.Band.HIGH, p.Band.NORMAL, p.Band.LOW


def spec(
    job_id: str, tenant: str = "a", band: p.Band = NORMAL, tpm: int = 0, estimate: int = 0
) -> p.JobSpec:
    return job_spec(job_id, tenant=tenant, band=band, tpm=tpm, token_estimate=estimate)


async def admit(store: Store, s: p.JobSpec, limit: int = 100, **tenant: int) -> AdmitStatus | int:
    result = await store.jobs.admit(
        s, limit=limit, hold_s=30, expire_s=30, tenant=TenantLimits(**tenant)
    )
    return result.status


async def picked(store: Store, limit: int) -> list[str]:
    """Ids the pick script returns (and claims)."""
    return [
        job_id for job_id, _score in await store.routing.pick_jobs(("m",), limit, in_progress_s=60)
    ]


async def test_max_concurrent_counts_queued_and_running_jobs_per_key(store: Store) -> None:
    statuses = [await admit(store, spec(f"a{i}"), max_concurrent=2) for i in range(3)]
    assert statuses == [AdmitStatus.ADMITTED, AdmitStatus.ADMITTED, AdmitStatus.CONCURRENCY]
    assert await admit(store, spec("b0", tenant="b"), max_concurrent=2) == AdmitStatus.ADMITTED
    await store.jobs.mark_started(spec("a0"), "w", hold_s=300)
    await store.jobs.release(spec("a0"), "w", None, p.Outcome.COMPLETED)
    assert await admit(store, spec("a3"), max_concurrent=2) == AdmitStatus.ADMITTED


async def test_rpm_bucket_refuses_with_the_time_until_a_request_fits(store: Store) -> None:
    results = [
        await store.jobs.admit(
            spec(f"r{i}"), limit=100, hold_s=30, expire_s=30, tenant=TenantLimits(rpm=3)
        )
        for i in range(4)
    ]
    assert [r.status for r in results] == [1, 1, 1, AdmitStatus.RPM]
    assert [r.rpm_left for r in results[:3]] == [2, 1, 0]
    assert 0 < results[3].retry_after_ms <= 20_000  # one request refills in 60 s / 3
    assert results[0].tpm_left == -1, "no tpm limit"
    assert await store.readings.in_system("m") == 3, "a refused request takes nothing"


async def test_tpm_is_taken_at_admission_and_corrected_with_exact_usage(
    store: Store, contract_redis
) -> None:
    first = spec("t0", tpm=1000, estimate=600)
    assert await admit(store, first) == AdmitStatus.ADMITTED
    assert await admit(store, spec("t1", tpm=1000, estimate=600)) == AdmitStatus.TPM
    await store.jobs.mark_started(first, "w", hold_s=300)
    await store.jobs.release(
        first, "w", 100, p.Outcome.COMPLETED
    )  # it used 100, not 600: 500 come back
    left = float(await contract_redis.hget(names.tenant_tpm_key("a"), "t"))
    assert 890 <= left <= 1000
    assert await admit(store, spec("t1", tpm=1000, estimate=600)) == AdmitStatus.ADMITTED


async def test_per_key_limits_come_before_the_global_bound(store: Store) -> None:
    assert await admit(store, spec("x0"), limit=1) == AdmitStatus.ADMITTED
    assert await admit(store, spec("x1"), limit=1, max_concurrent=1) == AdmitStatus.CONCURRENCY
    assert await admit(store, spec("y0", tenant="b"), limit=1) == AdmitStatus.FULL


async def test_cancel_removes_the_job_from_its_tenant_and_band(
    store: Store, contract_redis
) -> None:
    s = spec("c0", band=HIGH)
    assert await admit(store, s, max_concurrent=1) == AdmitStatus.ADMITTED
    assert (await store.readings.depth(["m"]))["m"] == {"high": 1, "normal": 0, "low": 0}
    assert await store.jobs.cancel(s) is True
    assert (await store.readings.depth(["m"]))["m"] == {"high": 0, "normal": 0, "low": 0}
    assert await contract_redis.zcard(names.tenant_admitted_key("a")) == 0
    assert await picked(store, 5) == []


async def test_higher_bands_are_served_first(store: Store) -> None:
    await admit(store, spec("low", tenant="c", band=LOW))
    await admit(store, spec("n1", tenant="a"))
    await admit(store, spec("n2", tenant="a"))
    await admit(store, spec("high", tenant="b", band=HIGH))
    assert await picked(store, 1) == ["high"]
    assert await picked(store, 10) == ["n1", "n2", "low"]


async def test_within_a_band_the_key_served_least_recently_goes_first(store: Store) -> None:
    for i in range(4):
        await admit(store, spec(f"a{i}", tenant="a"))
    assert await picked(store, 1) == ["a0"]
    await admit(store, spec("b0", tenant="b"))  # arrives behind three of a's
    assert await picked(store, 1) == ["b0"], "b was never served: it goes before a"
    await admit(store, spec("b1", tenant="b"))
    assert await picked(store, 2) == ["b1", "a1"], "a key with nothing waiting goes first"
    await admit(store, spec("b2", tenant="b"))
    await admit(store, spec("b3", tenant="b"))
    assert await picked(store, 5) == ["b2", "a2", "b3", "a3"], "both backlogged: turns"


async def test_reaper_gives_back_the_dead_workers_places_per_key(
    store: Store, contract_redis
) -> None:
    s = spec("d0")
    assert await admit(store, s, max_concurrent=1) == AdmitStatus.ADMITTED
    info = worker_info("dead", max_active=1, active=1)
    await store.workers.heartbeat(info, ttl_s=30)
    await store.jobs.mark_started(s, "dead", hold_s=300)
    await contract_redis.zadd(names.WORKERS, {"dead": 1})
    assert await store.workers.reap() == (["dead"], 1, 0)
    assert await admit(store, spec("d1"), max_concurrent=1) == AdmitStatus.ADMITTED
