"""Stored completions (``store: true``): detached jobs, resumed streams on any gateway,
retrieval, expiry, Idempotency-Key retries and cancellation, on real processes."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httpx
import pytest
import redis

from tests.support.clients import (
    Frames,
    assert_drained,
    body,
    new_key,
    read_frames,
    release,
    sim_stats,
    wait_held,
)
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration

TOKENS = 12
FULL_TEXT = "".join(f"tok{i} " for i in range(TOKENS))  # the simulator's uninterrupted answer


def stored(stream: bool = True, **sim: Any) -> dict[str, Any]:
    return {**body(stream=stream, tokens=TOKENS, **sim), "store": True}


async def post(c: httpx.AsyncClient, gw: Proc, payload: dict[str, Any], **kw: Any) -> Frames:
    return await read_frames(c, "POST", gw.url + "/v1/chat/completions", json=payload, **kw)


async def resume(c: httpx.AsyncClient, gw: Proc, job_id: str, after: int) -> Frames:
    return await read_frames(
        c,
        "GET",
        f"{gw.url}/v1/chat/completions/{job_id}",
        params={"stream": "true"},
        headers={"Last-Event-ID": str(after)},
    )


def after_event(whole: Frames, after: int) -> list[tuple[int | None, str]]:
    """The frames of ``whole`` that belong to events after ``after`` (a frame without an
    id belongs to the next frame's event)."""
    owners: list[int] = []
    owner = 0
    for i, _ in reversed(whole.frames):
        owner = i if i is not None else owner
        owners.append(owner)
    return [f for f, o in zip(whole.frames, reversed(owners), strict=True) if o > after]


def assert_whole(first: Frames, rest: Frames) -> None:
    """The two parts make the uninterrupted answer: no delta missing, none twice."""
    assert first.text + rest.text == FULL_TEXT
    ids = first.ids + rest.ids
    assert ids == sorted(set(ids)), ids
    assert rest.done


def test_dropped_stream_runs_on_and_resumes_on_another_gateway(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1, orphan_grace_s=1)
    gw1, gw2 = stack.gateway(), stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            # 300 ms a token: after the client leaves (3 chunks), tokens 4-8 are published
            # to nobody for ~1.5 s, past ORPHAN_GRACE_S (1 s), before the engine holds. A job
            # that is not detached would be abandoned there and never reach the hold.
            first = await post(c, gw1, stored(hold="r", hold_after=8, itl_ms=300), max_chunks=3)
            assert first.status == 200
            assert first.ids == [2, 3, 4]
            job_id = first.chunks[0]["id"]
            await asyncio.to_thread(wait_held, sim.url, "r", 1, 20)
            assert sim_stats(sim.url)["streams_abandoned"] == 0
            assert (await c.get(f"{gw2.url}/v1/chat/completions/{job_id}")).json()[
                "status"
            ] == "in_progress"
            resumed = asyncio.create_task(resume(c, gw2, job_id, first.last_id))
            channel = f"llmq:events:{job_id}"
            listeners = cast(Any, rdb).pubsub_numsub
            await asyncio.to_thread(
                wait_for, lambda: listeners(channel)[0][1] == 1, 10, "the resume"
            )
            await asyncio.to_thread(release, sim.url, "r")
            rest = await resumed
            assert rest.status == 200
            assert_whole(first, rest)

    asyncio.run(run())
    assert sim_stats(sim.url)["streams_abandoned"] == 0
    assert sim_stats(sim.url)["requests"] == 1
    assert_drained(rdb)


def test_gateway_killed_mid_stream_resume_through_another(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1)
    gw1, gw2 = stack.gateway(), stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            first = await post(c, gw1, stored(hold="k", hold_after=4), max_chunks=2)
            job_id = first.chunks[0]["id"]
            gw1.kill()  # SIGKILL: no goodbye to Redis, no cancel
            await asyncio.to_thread(release, sim.url, "k")
            rest = await resume(c, gw2, job_id, first.last_id)
            assert_whole(first, rest)

    asyncio.run(run())
    assert sim_stats(sim.url)["requests"] == 1
    assert_drained(rdb)


def test_after_the_end_resume_and_retrieve(stack: Stack, rdb: redis.Redis) -> None:
    stack.worker(max_active=2)
    gw = stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            whole = await post(c, gw, stored())
            assert whole.text == FULL_TEXT
            assert whole.done
            job_id = whole.chunks[0]["id"]
            url = f"{gw.url}/v1/chat/completions/{job_id}"
            # Resumed after the end: the same frames from there on, ending with [DONE].
            for after in (0, 3, whole.ids[-2]):
                again = await resume(c, gw, job_id, after)
                expected = after_event(whole, after)
                assert again.ids == [i for i in whole.ids if i > after]
                assert again.text == Frames(200, expected).text
                assert len(again.frames) == len(expected)
                assert again.done
            last = await resume(c, gw, job_id, whole.last_id)
            assert last.frames == [(whole.last_id, "[DONE]")]
            got = (await c.get(url)).json()
            assert got["object"] == "chat.completion"
            assert got["status"] == "completed"
            assert got["choices"][0]["message"] == {"role": "assistant", "content": FULL_TEXT}
            assert got["choices"][0]["finish_reason"] == "stop"
            assert got["usage"]["completion_tokens"] == TOKENS
            assert got["timings"]["completion_tokens"] == TOKENS
            # A non-streamed stored job: retrieved as it was answered.
            answer = (await c.post(gw.url + "/v1/chat/completions", json=stored(False))).json()
            kept = (await c.get(f"{gw.url}/v1/chat/completions/{answer['id']}")).json()
            assert kept["status"] == "completed"
            assert kept["choices"] == answer["choices"]
            assert kept["usage"] == answer["usage"]
            refused = await c.get(
                f"{gw.url}/v1/chat/completions/{answer['id']}", params={"stream": "true"}
            )
            assert refused.status_code == 400
            for missing in ("chatcmpl-nosuchjob", answer["id"] + "x"):
                gone = await c.get(f"{gw.url}/v1/chat/completions/{missing}")
                assert gone.status_code == 404
                assert gone.json()["error"]["code"] == "not_found"

    asyncio.run(run())
    assert_drained(rdb)


def test_stored_results_expire(stack: Stack, rdb: redis.Redis) -> None:
    stack.worker(store_ttl_s=2)
    gw = stack.gateway(store_ttl_s=2)
    answer = httpx.post(gw.url + "/v1/chat/completions", json=stored(False), timeout=30).json()
    url = f"{gw.url}/v1/chat/completions/{answer['id']}"
    for key in (f"llmq:stored:{answer['id']}", f"llmq:log:{answer['id']}"):
        assert rdb.pttl(key) != -1, f"{key} has no expiry"
    wait_for(lambda: httpx.get(url).status_code == 404, 10, "the stored result to expire")
    assert rdb.exists(f"llmq:log:{answer['id']}") == 0


def attached(gw: Proc, count: int) -> None:
    """Wait until ``gw`` attached ``count`` Idempotency-Key retries (its log says so)."""
    wait_for(
        lambda: gw.output().count("Idempotency-Key: attached") >= count,
        10,
        f"{count} retries attached",
    )


def test_idempotency_key_retry_attaches_to_the_one_job(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1)
    gw1, gw2 = stack.gateway(), stack.gateway()
    key = {"Idempotency-Key": "order-42"}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            payload = {**body(stream=True, tokens=TOKENS, hold="i", hold_after=3)}
            original = asyncio.create_task(post(c, gw1, payload, headers=key))
            await asyncio.to_thread(wait_held, sim.url, "i", 1)
            retry = asyncio.create_task(post(c, gw2, payload, headers=key))  # during the job
            await asyncio.to_thread(attached, gw2, 1)
            await asyncio.to_thread(release, sim.url, "i")
            a, b = await original, await retry
            assert a.text == b.text == FULL_TEXT
            assert a.chunks[0]["id"] == b.chunks[0]["id"]
            later = await post(c, gw1, payload, headers=key)  # after the job
            assert later.text == FULL_TEXT
            # Not streamed: a retry while it waits in the queue gets the one answer too.
            blocker = asyncio.create_task(post(c, gw1, body(tokens=1, hold="b", hold_after=0)))
            await asyncio.to_thread(wait_held, sim.url, "b", 1)
            single = {**body(stream=False, tokens=TOKENS), "store": True}
            plain_key = {"Idempotency-Key": "order-43"}
            url = gw1.url + "/v1/chat/completions"
            firsts = [asyncio.create_task(c.post(url, json=single, headers=plain_key))]
            await asyncio.to_thread(wait_for, lambda: rdb.zcard("llmq:queue") == 2, 10, "queued")
            firsts.append(asyncio.create_task(c.post(url, json=single, headers=plain_key)))
            await asyncio.to_thread(attached, gw1, 2)  # (the first: ``later`` above)
            await asyncio.to_thread(release, sim.url, "b")
            await blocker
            one, two = [(await t).json() for t in firsts]
            assert one["id"] == two["id"]
            assert one["choices"][0]["message"]["content"] == FULL_TEXT
            assert two["choices"] == one["choices"]
            other = await post(c, gw1, {**payload, "temperature": 0.5}, headers=key)
            assert other.status == 409
            assert b"idempotency_key_reused" in other.body

    asyncio.run(run())
    assert sim_stats(sim.url)["requests"] == 3  # the stream, the blocker, the non-streamed


def test_cancel_endpoint_stops_queued_and_running_jobs(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            url = gw.url + "/v1/chat/completions"
            running = asyncio.create_task(post(c, gw, stored(hold="c", hold_after=2)))
            await asyncio.to_thread(wait_held, sim.url, "c", 1)
            queued = asyncio.create_task(c.post(url, json=body(stream=False, tokens=2)))
            await asyncio.to_thread(wait_for, lambda: rdb.zcard("llmq:queue") == 2, 10, "queued")
            queued_id = next(
                m.decode()
                for m in rdb.zrange("llmq:queue", 0, -1)  # type: ignore[union-attr]
                if not rdb.exists(f"arq:in-progress:{m.decode()}")
            )
            out = (await c.post(f"{url}/{queued_id}/cancel")).json()
            assert out["status"] == "cancelled"
            answer = await queued
            assert answer.status_code == 409
            assert answer.json()["error"]["code"] == "cancelled"
            running_id = next(iter(rdb.zrange("llmq:queue", 0, -1))).decode()  # type: ignore[arg-type]
            assert (await c.post(f"{url}/{running_id}/cancel")).json()["status"] == "cancelling"
            stream = await running
            assert stream.done
            assert '"error"' in stream.frames[-2][1]
            await asyncio.to_thread(
                wait_for,
                lambda: httpx.get(f"{url}/{running_id}").json()["status"] == "cancelled",
                10,
                "the stored status to say cancelled",
            )
            assert (await c.post(f"{url}/chatcmpl-unknown/cancel")).status_code == 404

    asyncio.run(run())
    assert sim_stats(sim.url)["requests"] == 1
    assert_drained(rdb)


def test_only_the_key_that_stored_a_completion_sees_it(stack: Stack) -> None:
    stack.worker()
    gw = stack.gateway(auth="keys")
    owner = {"Authorization": "Bearer " + new_key(stack, "owner")}
    other = {"Authorization": "Bearer " + new_key(stack, "other")}
    url = gw.url + "/v1/chat/completions"
    answer = httpx.post(url, json=stored(False), headers=owner, timeout=30).json()
    assert httpx.get(f"{url}/{answer['id']}", headers=owner).json()["status"] == "completed"
    for attempt in (
        httpx.get(f"{url}/{answer['id']}", headers=other),
        httpx.get(f"{url}/{answer['id']}", headers=other, params={"stream": "true"}),
        httpx.post(f"{url}/{answer['id']}/cancel", headers=other),
        httpx.delete(f"{url}/{answer['id']}", headers=other),
    ):
        assert attempt.status_code == 404, attempt.text
    assert httpx.get(f"{url}/{answer['id']}").status_code == 401
    assert httpx.delete(f"{url}/{answer['id']}", headers=owner).json()["deleted"] is True
    assert httpx.get(f"{url}/{answer['id']}", headers=owner).status_code == 404
