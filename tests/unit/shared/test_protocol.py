from __future__ import annotations

import pytest

from llmq.shared.protocol import Event, EventType, WorkerInfo, worker_job_owner
from llmq.shared.queue.names import events_channel, job_key, worker_key


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


async def test_sse_data_accepts_any_chunking_and_stops_at_done() -> None:
    from llmq.shared import sse

    body = b'data: {"a": 1}\n\n: comment\nid: 3\ndata: {"b": 2}\n\ndata: [DONE]\n\n'

    async def chunks(size: int):
        for i in range(0, len(body), size):
            yield body[i : i + size]

    for size in (1, 3, 7, len(body)):
        assert [d async for d in sse.data(chunks(size))] == [b'{"a": 1}', b'{"b": 2}']

    async def cut():
        yield body[:20]

    with pytest.raises(sse.StreamEndedEarly):
        [d async for d in sse.data(cut())]


def test_a_message_holds_several_events_in_order() -> None:
    from llmq.shared.protocol import encode_message

    events = [Event(1, EventType.STARTED, b"w"), Event(2, EventType.CHUNK, b'{"x": "a b"}')]
    message = encode_message([e.encode() for e in events])
    assert Event.decode_message(message) == events


def test_a_running_jobs_owner_reads_every_version_of_its_record() -> None:
    assert worker_job_owner(b'["team-a","m","high"]') == ("team-a", "m")
    assert worker_job_owner(b'["team-a","m"]') == ("team-a", "m")
    assert worker_job_owner(b"team-a") == ("team-a", "")
