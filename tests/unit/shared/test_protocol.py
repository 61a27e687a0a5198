from __future__ import annotations

import pytest

from llmq.shared.protocol import Event, EventType, WorkerInfo, events_channel, job_key, worker_key


def test_event_round_trip_keeps_data_with_spaces() -> None:
    e = Event(7, EventType.CHUNK, b'{"content": "a b  c"}')
    assert Event.decode(e.encode()) == e


def test_event_decode_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Event.decode(b"1 bogus {}")


def test_worker_info_hash_round_trip() -> None:
    info = WorkerInfo(
        worker_id="w",
        max_active=3,
        active=2,
        models=("a", "b"),
        engine_ready=False,
        engine_url="http://x",
        started_at=12.5,
    )
    raw = {k.encode(): v.encode() for k, v in info.to_hash().items()}
    assert WorkerInfo.from_hash(raw) == info


def test_keys_follow_the_documented_schema() -> None:
    assert job_key("chatcmpl-1") == "arq:job:chatcmpl-1"
    assert events_channel("chatcmpl-1") == "llmq:events:chatcmpl-1"
    assert worker_key("w1") == "llmq:worker:w1"
