"""Private by default: after a job ends, whatever the outcome, no prompt and no completion is
left anywhere in Redis; while it waits, its prompt lives only in its job key.

These tests run with PAYLOAD_KEYS=none, so that what is kept shows in clear: a sealed
leftover would hide from them. What sealing hides is ``test_sealing``'s."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import (
    assert_drained,
    body,
    everything,
    release,
    stream_chat,
    wait_held,
)
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration
PLAIN = "none"


def holding(rdb: redis.Redis, canary: bytes) -> list[bytes]:
    return [k for k, v in everything(rdb).items() if canary in k or canary in v]


def test_nothing_of_a_job_is_left_in_redis_whatever_its_outcome(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    stack.worker(max_active=1, orphan_grace_s=1, payload_keys=PLAIN)
    gw = stack.gateway(payload_keys=PLAIN)
    prompt = b"PROMPT-" + secrets.token_hex(8).encode()
    said = "SAID" + secrets.token_hex(8)

    def job(stream: bool = False, **sim_knobs: Any) -> dict[str, Any]:
        b = body(stream=stream, say=said, **sim_knobs)
        b["messages"][0]["content"] = prompt.decode()
        return b

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            url = gw.url + "/v1/chat/completions"
            # A job waiting behind a held one: its prompt is in its job key, nowhere else.
            held = asyncio.create_task(c.post(url, json=job(hold="h", tokens=2)))
            await asyncio.to_thread(wait_held, sim.url, "h", 1)
            waiting = asyncio.create_task(c.post(url, json=job(tokens=2)))
            await asyncio.to_thread(wait_for, lambda: rdb.zcard("llmq:queue") == 2, 10, "queued")
            keys = await asyncio.to_thread(holding, rdb, prompt)
            assert len(keys) == 2, keys  # the two job keys
            assert all(k.startswith(b"arq:job:") for k in keys), keys
            await asyncio.to_thread(release, sim.url, "h")
            assert (await held).status_code == 200
            done = await waiting
            assert said in done.json()["choices"][0]["message"]["content"]
            streamed = await stream_chat(c, gw.url, job(stream=True, tokens=3))
            assert said in streamed.text
            refused = await c.post(url, json=job(fail_status=400))
            assert refused.status_code == 400
            failed = await stream_chat(c, gw.url, job(stream=True, tokens=5, drop_after=2))
            assert failed.sse_errors
            # A client that leaves mid-stream: the job is cancelled.
            left = await stream_chat(
                c, gw.url, job(stream=True, tokens=50, itl_ms=50), max_chunks=2
            )
            assert left.status == 200

    asyncio.run(run())
    assert_drained(rdb, within=15)
    wait_for(lambda: not rdb.keys("arq:in-progress:*"), 15, "arq to finish every job")
    assert holding(rdb, prompt) == []
    assert holding(rdb, said.encode()) == []
    assert len(everything(rdb).keys() & set(rdb.scan_iter("llmq:outcome:*"))) == 6


def test_logs_hold_no_prompt_no_completion_and_no_forged_line(
    stack: Stack, rdb: redis.Redis
) -> None:
    """Even at LOG_LEVEL=DEBUG; engine text that echoes client input is escaped."""
    worker = stack.worker(log_level="DEBUG", payload_keys=PLAIN)
    gw = stack.gateway(log_level="DEBUG", payload_keys=PLAIN)
    prompt = "PROMPT-" + secrets.token_hex(8)
    said = "SAID" + secrets.token_hex(8)
    b = body(stream=True, say=said, tokens=3)
    b["messages"][0]["content"] = prompt

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await stream_chat(c, gw.url, b)
            assert said in r.text
            forged = body(stream=False, fail_status=400, fail_message="bad\nERROR forged line")
            refused = await c.post(gw.url + "/v1/chat/completions", json=forged)
            assert refused.status_code == 400

    asyncio.run(run())
    assert_drained(rdb)
    for proc in (worker, gw):
        log = proc.output()
        assert prompt not in log
        assert said not in log
        assert "\nERROR forged line" not in log
    assert "bad\\nERROR forged line" in worker.output(), "logged, escaped"


@pytest.mark.parametrize("ask", ["store", "idempotency-key"])
def test_a_stored_job_keeps_what_its_client_asked_for_and_no_more(
    stack: Stack, rdb: redis.Redis, ask: str
) -> None:
    """store: true keeps the completion (its log), a record and, as OpenAI's
    stored-completion API lists them, the request's messages (in the record), all with a
    TTL. An Idempotency-Key alone keeps the completion (a retry must find it), never the
    prompt: it is gone with the job as for any other."""
    stack.worker(payload_keys=PLAIN)
    gw = stack.gateway(payload_keys=PLAIN)
    prompt = "PROMPT-" + secrets.token_hex(8)
    said = "SAID" + secrets.token_hex(8)
    payload = body(stream=True, say=said, tokens=3)
    headers = {}
    if ask == "store":
        payload["store"] = True
    else:
        headers["Idempotency-Key"] = secrets.token_hex(8)
    payload["messages"][0]["content"] = prompt

    async def run() -> str:
        async with httpx.AsyncClient(timeout=60, headers=headers) as c:
            r = await stream_chat(c, gw.url, payload)
            assert said in r.text
            return str(r.chunks[0]["id"])

    job_id = asyncio.run(run())
    assert_drained(rdb)
    stored = f"llmq:stored:{job_id}".encode()
    if ask == "store":
        wait_for(lambda: holding(rdb, prompt.encode()) == [stored], 5, "only the record")
    else:
        wait_for(lambda: not holding(rdb, prompt.encode()), 5, "the prompt to leave Redis")
    kept = holding(rdb, said.encode())
    assert kept == [f"llmq:log:{job_id}".encode()], kept
    for key in (f"llmq:log:{job_id}", f"llmq:stored:{job_id}"):
        assert int(rdb.ttl(key)) > 0, key  # type: ignore[arg-type]
