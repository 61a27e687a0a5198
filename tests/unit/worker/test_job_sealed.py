"""The job function with PAYLOAD_KEYS: it opens the body the gateway sealed, seals what it
publishes, and fails a job no key of its opens (payload_undecryptable, not retried)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from arq.jobs import deserialize_job

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.store import Store
from llmq.shared.sealing import Sealer, new_key, parse_keys
from llmq.shared.settings import Settings
from llmq.worker.engine import EngineClient
from llmq.worker.job import chat
from llmq.worker.metrics import WorkerMetrics
from llmq.worker.outbox import Outbox
from llmq.worker.runtime import RUNTIME, Runtime
from tests.support.clients import sse_bytes as sse
from tests.support.fake_engine import fake_engine

CANARY = "CANARY-5e1d"
JOB = "chatcmpl-s"


def spec() -> p.JobSpec:
    return p.JobSpec(
        id=JOB,
        model="m",
        stream=True,
        include_usage=False,
        enqueued_at_ms=int(time.time() * 1000),
        body={"model": "m", "messages": [{"role": "user", "content": CANARY}]},
    )


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "engine-id",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def run(fake_redis: Any, gateway_key: str, worker_keys: str) -> dict[str, Any]:
    """Admit the job through a gateway's store sealing with ``gateway_key``, run it on a
    worker holding ``worker_keys``; returns what the engine got, what was published (raw)
    and the worker's outcome and metrics."""
    gateway = Store(fake_redis, sealer=Sealer(parse_keys(gateway_key)))
    await gateway.jobs.admit(spec(), limit=5, hold_s=30, expire_s=30)
    raw = await fake_redis.get(names.job_key(JOB))
    queued = deserialize_job(raw, deserializer=p.json_loads).args[0]  # what arq passes
    metrics = WorkerMetrics()
    worker = Store(fake_redis, sealer=Sealer(parse_keys(worker_keys), metrics.undecryptable.inc))
    seen: list[bytes] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        body = sse(chunk(f"said {CANARY}"), chunk(finish="stop"))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(names.events_channel(JOB))
    await pubsub.get_message(timeout=1)
    async with fake_engine(engine) as url:
        client = EngineClient(url, max_connections=2)
        rt = Runtime(
            settings=Settings(),
            store=worker,
            batches=BatchStore(fake_redis, 3600, sealer=worker.sealer),
            engine=client,
            metrics=metrics,
            outbox=Outbox(worker),
        )
        try:
            result = await chat({RUNTIME: rt}, queued)
        finally:
            await client.aclose()
    published = []
    while (msg := await pubsub.get_message(timeout=0.2)) is not None:
        published.append(msg["data"])
    await pubsub.aclose()
    return {
        "queued": raw,
        "engine": seen,
        "published": published,
        "result": result,
        "metrics": metrics,
        "in_system": await worker.readings.in_system("m"),
        "sealer": worker.sealer,
    }


def sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_a_sealed_job_runs_and_publishes_only_ciphertext(fake_redis: Any) -> None:
    key = new_key()
    out = await run(fake_redis, key, key)
    assert CANARY.encode() not in out["queued"]
    assert out["result"]["outcome"] == "completed"
    assert CANARY.encode() in out["engine"][0], "the engine got the opened request"
    wire = b"\n".join(out["published"])
    assert CANARY.encode() not in wire
    events = [out["sealer"].open_event(JOB, e) for e in p.Event.decode_message(wire)]
    assert [e.type for e in events] == [p.EventType.STARTED, p.EventType.CHUNK, p.EventType.DONE]
    assert json.loads(events[1].data)["choices"][0]["delta"]["content"] == f"said {CANARY}"


async def test_keys_rotated_on_the_worker_still_open_a_job_sealed_before(fake_redis: Any) -> None:
    old, new = new_key(), new_key()
    out = await run(fake_redis, old, f"{new},{old}")
    assert out["result"]["outcome"] == "completed"
    assert CANARY.encode() in out["engine"][0]


async def test_a_job_no_key_opens_fails_once_with_payload_undecryptable(fake_redis: Any) -> None:
    out = await run(fake_redis, new_key(), new_key())
    assert out["result"]["outcome"] == p.Outcome.UNDECRYPTABLE
    assert out["engine"] == [], "nothing reached the engine"
    events = [
        out["sealer"].open_event(JOB, e)
        for m in out["published"]
        for e in p.Event.decode_message(m)
    ]
    assert [e.type for e in events] == [p.EventType.STARTED, p.EventType.ERROR]
    error = json.loads(events[1].data)
    assert error["code"] == "payload_undecryptable"
    assert error["status"] == 500
    assert out["in_system"] == 0, "its place is released: it is not retried"
    assert sample(out["metrics"], "worker_payload_undecryptable_total") == 1
    labels = {"outcome": "payload_undecryptable"}
    assert sample(out["metrics"], "worker_jobs_total", labels) == 1
