"""A stored completion assembled from its logged events (no Redis needed)."""

from __future__ import annotations

import json
from typing import Any

from llmq.gateway.durable import assemble
from llmq.shared.errors import WorkerLost
from llmq.shared.protocol import Event, EventType, StoredJob, StoredStatus


def record(status: StoredStatus) -> StoredJob:
    return StoredJob(
        id="chatcmpl-s",
        tenant="t",
        band="normal",
        model="m",
        stream=True,
        include_usage=False,
        enqueued_at_ms=1_700_000_000_000,
        status=status,
    )


def chunk(seq: int, index: int, delta: dict[str, Any], finish: str | None = None) -> Event:
    data = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1_700_000_001,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return Event(seq, EventType.CHUNK, json.dumps(data).encode())


def test_a_streamed_job_is_joined_per_choice_with_usage_and_timings() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    final = json.loads(chunk(0, 1, {}, "length").data)
    done = {"final": final, "usage": usage, "timings": {}}
    events = [
        Event(1, EventType.STARTED, b"w"),
        chunk(2, 0, {"role": "assistant", "content": "Hel"}),
        chunk(3, 1, {"role": "assistant", "content": "Bon"}),
        chunk(4, 0, {"content": "lo"}),
        chunk(5, 0, {}, "stop"),
        chunk(6, 1, {"content": "jour"}),
        Event(7, EventType.DONE, json.dumps(done).encode()),
    ]
    out = assemble(record(StoredStatus.IN_PROGRESS), events)
    assert out["status"] == "completed"  # the log has the end, the record not yet
    assert out["created"] == 1_700_000_001
    assert [c["message"]["content"] for c in out["choices"]] == ["Hello", "Bonjour"]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "length"]
    assert out["usage"] == usage
    assert out["timings"] == {}


def test_in_progress_shows_the_text_so_far_and_a_failure_its_error() -> None:
    partial = [chunk(2, 0, {"role": "assistant", "content": "Hal"})]
    out = assemble(record(StoredStatus.IN_PROGRESS), partial)
    assert out["status"] == "in_progress"
    assert out["choices"][0]["message"]["content"] == "Hal"
    assert out["choices"][0]["finish_reason"] is None
    lost = json.dumps(WorkerLost("gone").to_wire()).encode()
    failed = assemble(record(StoredStatus.FAILED), [*partial, Event(0, EventType.ERROR, lost)])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "worker_lost"
    assert assemble(record(StoredStatus.QUEUED), [])["choices"] == []


def test_a_non_streamed_job_is_its_result() -> None:
    result = {"id": "chatcmpl-s", "object": "chat.completion", "choices": [{"index": 0}]}
    events = [
        Event(1, EventType.STARTED, b"w"),
        Event(2, EventType.RESULT, json.dumps(result).encode()),
    ]
    expected = {**result, "status": "completed", "metadata": {}}
    assert assemble(record(StoredStatus.COMPLETED), events) == expected
