"""Payloads at rest (PAYLOAD_KEYS): a canary sent in prompts, stored requests and a batch
file, and said back in the answers, is found in no Redis value, in no AOF or RDB file (read
as they stand) and nowhere on a replica, while the jobs run and after they end; jobs queued
before a key rotation are served after it."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from llmq.shared.queue import names
from llmq.shared.sealing import key_id, new_key, parse_keys
from tests.support.clients import (
    MODEL,
    body,
    cli,
    everything,
    release,
    stream_chat,
    wait_held,
)
from tests.support.stack import Proc, Stack, stack_for, start_redis, wait_for

pytestmark = pytest.mark.integration


def files_holding(folder: Path, needle: bytes) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and needle in f.read_bytes()]


def files_bytes(folder: Path) -> bytes:
    return b"".join(f.read_bytes() for f in folder.rglob("*") if f.is_file())


def info(client: Any, field: str) -> str:
    return str(client.info("replication").get(field, ""))


class Replicated:
    """A primary with AOF and a replica of it with AOF, each in a folder of its own."""

    def __init__(self, logdir: Path, tmp: Path) -> None:
        self.primary_dir, self.replica_dir = tmp / "primary", tmp / "replica"
        self.primary_dir.mkdir()
        self.replica_dir.mkdir()
        self.primary = start_redis(logdir, data_dir=self.primary_dir, persistent=True)
        self.replica = start_redis(
            logdir, data_dir=self.replica_dir, persistent=True, replica_of=self.primary.port
        )
        # Any: redis-py's stubs say every reply may be awaitable.
        self.p: Any = redis.Redis(port=self.primary.port)
        self.r: Any = redis.Redis(port=self.replica.port)
        wait_for(lambda: info(self.r, "master_link_status") == "up", 20, "the replica's sync")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.primary.port}/0"

    def settle(self) -> None:
        """The replica has everything the primary wrote; both write an RDB snapshot."""
        wait_for(
            lambda: info(self.r, "slave_repl_offset") == info(self.p, "master_repl_offset"),
            20,
            "the replica to catch up",
        )
        self.p.save()
        self.r.save()

    def holding(self, needle: bytes) -> list[str]:
        """Where ``needle`` is: keys and values of both, and every file of both."""
        self.settle()
        found = [f"primary {k!r}" for k, v in everything(self.p).items() if needle in k + v]
        found += [f"replica {k!r}" for k, v in everything(self.r).items() if needle in k + v]
        return (
            found
            + files_holding(self.primary_dir, needle)
            + files_holding(self.replica_dir, needle)
        )

    def close(self) -> None:
        self.p.close()
        self.r.close()
        self.replica.kill()
        self.primary.kill()


@pytest.fixture
def replicated(logdir: Path, tmp_path: Path) -> Iterator[Replicated]:
    r = Replicated(logdir, tmp_path)
    yield r
    r.close()


@pytest.fixture
def sealed_stack(
    replicated: Replicated, sim: Proc, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    httpx.post(sim.url + "/sim/reset")
    with stack_for(request, replicated.url, sim.url, logdir) as s:
        yield s


def canary_body(canary: str, **sim: Any) -> dict[str, Any]:
    """A request whose prompt holds the canary and whose answer says it."""
    b = body(say=canary, **sim)
    b["messages"] = [{"role": "user", "content": f"remember {canary} please"}]
    return b


def batch_file(canary: str, n: int) -> bytes:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"line {i}: {canary}"}],
                "sim": {"tokens": 2, "say": canary},
            },
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_no_canary_in_redis_its_files_or_its_replica_while_jobs_run_and_after(
    sealed_stack: Stack, replicated: Replicated, sim: Proc
) -> None:
    stack, rep = sealed_stack, replicated
    stack.worker(max_active=2, batch_feed_s=0.1)
    gw = stack.gateway()
    canary = "CANARY" + secrets.token_hex(8)
    url = gw.url + "/v1/chat/completions"
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(timeout=60) as c:
            # Two running jobs, each held after two deltas (a plain one and a stored one,
            # whose deltas are logged), and one waiting behind them.
            streamed = asyncio.create_task(
                stream_chat(c, gw.url, canary_body(canary, stream=True, hold="c", hold_after=2))
            )
            stored_body = canary_body(canary, stream=True, hold="c", hold_after=2)
            stored = asyncio.create_task(stream_chat(c, gw.url, {**stored_body, "store": True}))
            await asyncio.to_thread(wait_held, sim.url, "c", 2)
            waiting = asyncio.create_task(c.post(url, json=canary_body(canary, stream=False)))
            await asyncio.to_thread(
                wait_for, lambda: rep.p.zcard(names.QUEUE) == 3, 10, "the third job queued"
            )
            queued = [m.decode() for m in rep.p.zrange(names.QUEUE, 0, -1)]
            uploaded = await asyncio.to_thread(
                sdk.files.create,
                file=("in.jsonl", io.BytesIO(batch_file(canary, 3))),
                purpose="batch",
            )
            batch = await asyncio.to_thread(
                sdk.batches.create,
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )

            found = await asyncio.to_thread(rep.holding, canary.encode())
            assert found == [], f"while the jobs run: {found}"
            # The files and the replica were read: the jobs' metadata is there, in clear.
            for job_id in queued:
                assert job_id.encode() in files_bytes(rep.primary_dir)
                assert job_id.encode() in files_bytes(rep.replica_dir)
                assert rep.r.exists(names.job_key(job_id))

            await asyncio.to_thread(release, sim.url, "c")
            plain, kept, answered = await streamed, await stored, await waiting
            assert canary in plain.text
            assert canary in kept.text
            assert canary in answered.json()["choices"][0]["message"]["content"]
            return str(kept.chunks[0]["id"]), batch.id

    stored_id, batch_id = asyncio.run(run())
    wait_for(lambda: sdk.batches.retrieve(batch_id).status == "completed", 60, "the batch")
    out = sdk.files.content(sdk.batches.retrieve(batch_id).output_file_id or "").text
    assert out.count(canary) >= 3, "the answers are in the output file, opened"
    kept = list(sdk.chat.completions.messages.list(stored_id))
    assert canary in str(kept[0].content), "the stored messages, opened"
    retrieved = sdk.chat.completions.retrieve(stored_id)
    assert canary in (retrieved.choices[0].message.content or "")
    uploaded = sdk.batches.retrieve(batch_id).input_file_id
    assert sdk.files.content(uploaded).text.count(canary) >= 3, "the input file, opened"

    found = rep.holding(canary.encode())
    assert found == [], f"after the jobs ended: {found}"
    sdk.close()


def test_jobs_queued_before_a_key_rotation_are_served_after_it(
    sealed_stack: Stack, replicated: Replicated, sim: Proc
) -> None:
    """Key A seals a finished stored completion and a stored job that waits; the gateway
    and the worker restart with PAYLOAD_KEYS=B,A and serve both. A gateway holding only B
    answers payload_undecryptable for what A sealed, and counts it."""
    stack, rep = sealed_stack, replicated
    old, new = new_key(), new_key()
    worker = stack.worker(max_active=1, payload_keys=old)
    gw = stack.gateway(payload_keys=old)
    canary = "CANARY" + secrets.token_hex(8)

    url = gw.url + "/v1/chat/completions"
    first = httpx.post(url, json={**canary_body(canary, stream=False), "store": True}, timeout=60)
    assert first.status_code == 200
    done_id = str(first.json()["id"])
    # Stored jobs outlive their clients: one holds the only slot, one waits behind it.
    leave = httpx.Timeout(60, read=1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={**body(stream=False, hold="blk"), "store": True}, timeout=leave)
    wait_held(sim.url, "blk", 1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={**canary_body(canary, stream=False), "store": True}, timeout=leave)
    queued_id = waiting_job(rep.p)
    worker.signal(signal.SIGKILL)  # the blocker dies with it; the stored job waits on
    gw.stop()
    release(sim.url, "blk")

    stack.worker(max_active=1, payload_keys=f"{new},{old}")
    gw2 = stack.gateway(payload_keys=f"{new},{old}")
    sdk = openai.OpenAI(base_url=gw2.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    wait_for(
        lambda: (
            httpx.get(f"{gw2.url}/v1/chat/completions/{queued_id}").json()["status"] == "completed"
        ),
        30,
        "the job queued before the rotation to complete",
    )
    answer = sdk.chat.completions.retrieve(queued_id).choices[0].message.content or ""
    assert canary in answer
    assert canary in (sdk.chat.completions.retrieve(done_id).choices[0].message.content or "")
    assert canary in str(next(iter(sdk.chat.completions.messages.list(queued_id))).content)
    assert rep.holding(canary.encode()) == []
    sdk.close()
    # Which key sealed what: the old one still seals stored completions, so it stays.
    old_id, new_id = (key_id(parse_keys(k)[0]).decode() for k in (old, new))
    by_key = sealed_by(stack, PAYLOAD_KEYS=f"{new},{old}")
    assert by_key[old_id]["stored"] >= 2, by_key  # the finished one, the rotated one's messages
    assert by_key[new_id]["stored"] >= 1, by_key  # the rotated one's answer
    assert by_key[old_id]["held"] == by_key[new_id]["held"] == "held"
    assert "plain" not in by_key
    assert sealed_by(stack, PAYLOAD_KEYS=new)[old_id]["held"] == "NOT held here"

    gw3 = stack.gateway(payload_keys=new)  # A removed: what it sealed does not open
    refused = httpx.get(f"{gw3.url}/v1/chat/completions/{done_id}/messages")
    assert refused.status_code == 500
    assert refused.json()["error"]["code"] == "payload_undecryptable"
    metrics = httpx.get(f"http://127.0.0.1:{gw3.metrics_port}/metrics").text
    assert "api_payload_undecryptable_total 1.0" in metrics
    # B sealed the newer answer: it still opens.
    fresh = httpx.get(f"{gw3.url}/v1/chat/completions/{queued_id}")
    assert canary in fresh.json()["choices"][0]["message"]["content"]


def sealed_by(stack: Stack, **env: str) -> dict[str, dict[str, Any]]:
    """``llmq-jobs sealed``: key id -> {kind: count, "held": ...}."""
    out = cli(stack, "llmq.cli.llmq_jobs", "sealed", **env)
    assert out.returncode == 0, out.stderr
    rows: dict[str, dict[str, Any]] = {}
    for line in out.stdout.splitlines():
        kid, _, rest = line.partition("  ")
        counts, _, held = rest.partition("  (")
        row: dict[str, Any] = {k: int(v) for k, v in (p.split("=") for p in counts.split())}
        row["held"] = held.rstrip(")")
        rows[kid.strip()] = row
    return rows


def waiting_job(rdb: Any) -> str:
    """The one job in the queue that has not started."""
    out: list[str] = []

    def found() -> bool:
        out[:] = [
            m.decode()
            for m in rdb.zrange(names.QUEUE, 0, -1)
            if not rdb.exists(f"arq:in-progress:{m.decode()}")
        ]
        return len(out) == 1

    wait_for(found, 10, "one waiting job")
    return out[0]
