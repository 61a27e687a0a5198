"""BatchStore's bookkeeping (fakeredis: Lua included): feeding once, counting each result
once, finalizing once."""

from __future__ import annotations

import json
import time
from typing import Any

from arq.jobs import serialize_job

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.batch_records import BatchRecord, BatchStatus, output_line
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.store import Store
from tests.support.records import job_spec


def spec(rec: BatchRecord, index: int) -> p.JobSpec:
    return p.JobSpec(
        id=names.batch_job_id(rec.id, index),
        model="m",
        stream=False,
        include_usage=False,
        enqueued_at_ms=0,
        tenant=rec.tenant,
        band=p.Band.LOW,
        batch_id=rec.id,
        batch_index=index,
        custom_id=f"c{index}",
        body={},
    )


def in_progress(batch_id: str, source: str, total: int, **fields: Any) -> BatchRecord:
    now = int(time.time())
    return BatchRecord(
        id=batch_id,
        tenant="t",
        input_file_id=source,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        status=BatchStatus.IN_PROGRESS,
        created_at=now,
        expires_at=now + 60,
        total=total,
        **fields,
    )


async def test_feed_record_finalize_each_once(contract_redis) -> None:
    batches = BatchStore(contract_redis, file_ttl_s=60)
    lines = [json.dumps({"custom_id": f"c{i}"}).encode() for i in range(3)]
    source = await batches.create_file("t", "batch", "in.jsonl", lines)
    rec = in_progress("batch_x", source.id, 3, max_inflight=3)
    await batches.create_batch(rec)
    specs = [spec(rec, i) for i in range(3)]
    assert await batches.feed(rec, specs, 3) == 3
    assert await batches.feed(rec, specs, 3) == 0  # another feeder read the same ``next``
    assert await contract_redis.zcard(names.QUEUE) == 3
    for i, s in enumerate(specs):
        ok = i != 1
        assert await batches.record(s, output_line(s.id, s.custom_id, 200 if ok else 400, {}), ok)
    assert not await batches.record(specs[0], "again", True)  # counted once
    fed = await batches.batch(rec.id)
    assert fed is not None
    assert (fed.completed, fed.failed, fed.next) == (2, 1, 3)
    done = await batches.finalize(fed)
    assert done is not None
    assert done.status is BatchStatus.COMPLETED
    assert await batches.finalize(fed) is None  # a second finalizer finds it done
    assert done.output_file_id is not None
    out = [json.loads(x) for x in await batches.file_lines(done.output_file_id)]
    assert [o["custom_id"] for o in out] == ["c0", "c2"]
    assert done.error_file_id is not None
    assert await batches.active() == []


async def test_a_dead_workers_batch_request_becomes_one_error_line(contract_redis) -> None:
    """The reaper: a batch request of a worker whose heartbeat expired is a worker_lost
    error line, counted as failed, and leaves the inflight set."""
    store = Store(contract_redis)
    batches = BatchStore(contract_redis, file_ttl_s=60)
    rec_id, job_id = "batch_y", names.batch_job_id("batch_y", 4)
    await contract_redis.hset(names.batch_key(rec_id), mapping={"failed": 0})
    await contract_redis.sadd(names.batch_part_key(rec_id, names.BATCH_INFLIGHT), job_id)
    request = job_spec(job_id).model_copy(
        update={"batch_id": rec_id, "batch_index": 4, "custom_id": "the-fifth"}
    )
    payload = serialize_job(  # as the feed script stores it: arq's own format
        p.JOB_FUNCTION, (request.model_dump(mode="json"),), {}, 1, 0, serializer=p.json_dumps
    )
    await contract_redis.set(names.job_key(job_id), payload)
    await contract_redis.hset(names.worker_jobs_key("dead"), job_id, "t")
    await contract_redis.zadd(names.WORKERS, {"dead": 1})
    dead, jobs, _ = await store.workers.reap()
    assert (dead, jobs) == (["dead"], 1)
    line = json.loads(await contract_redis.hget(names.batch_part_key(rec_id, names.BATCH_ERR), "4"))
    assert line["custom_id"] == "the-fifth"
    assert line["error"]["code"] == "worker_lost"
    assert await contract_redis.hget(names.batch_key(rec_id), "failed") == b"1"
    assert await batches.inflight(rec_id) == []


async def test_end_stops_a_running_batch_once_and_a_cancel_shows_cancelling(contract_redis) -> None:
    batches = BatchStore(contract_redis, file_ttl_s=60)
    for batch_id in ("batch_c", "batch_e"):
        await contract_redis.hset(names.batch_key(batch_id), mapping={"status": "in_progress"})
    assert await batches.end("batch_c", "cancelled") == BatchStatus.CANCELLING
    assert await batches.end("batch_c", "expired") == BatchStatus.CANCELLING, "ended once"
    assert await contract_redis.hget(names.batch_key("batch_c"), "ending") == b"cancelled"
    assert await batches.end("batch_e", "expired") == BatchStatus.IN_PROGRESS
    assert await contract_redis.hget(names.batch_key("batch_e"), "ending") == b"expired"
    await contract_redis.hset(names.batch_key("batch_d"), mapping={"status": "completed"})
    assert await batches.end("batch_d", "cancelled") == BatchStatus.COMPLETED
    assert await contract_redis.hget(names.batch_key("batch_d"), "ending") is None


async def test_demand_names_the_served_models_of_batches_with_lines_to_feed(contract_redis) -> None:
    """The scaling signal keeps one worker for a model whose batch still has lines, so that a
    model scaled to zero runs its batches (aliases resolved as the batch fixed them)."""
    batches = BatchStore(contract_redis, file_ttl_s=60)
    source = await batches.create_file("t", "batch", "in.jsonl", [b"{}"], models=("alias", "m2"))
    rec = in_progress("batch_d", source.id, 1, routes=json.dumps({"alias": "served"}))
    await batches.create_batch(rec)
    assert (await batches.overview())[1] == {"served", "m2"}
    assert await batches.feed(rec, [spec(rec, 0)], 1) == 1
    # every line fed: the queue signal counts them now
    assert (await batches.overview())[1] == set()
