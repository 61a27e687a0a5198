"""One pub/sub connection fanned out to per-job queues (fakeredis pub/sub)."""

from __future__ import annotations

import pytest

from llmq.gateway.events import Subscriptions
from llmq.shared.errors import StreamInterrupted
from llmq.shared.protocol import Event, EventType, encode_message
from llmq.shared.queue.names import events_channel


async def test_events_reach_only_their_job_in_order(fake_redis) -> None:
    subs = Subscriptions(fake_redis)
    await subs.start()
    try:
        a = await subs.subscribe("job-a")  # returns once Redis confirmed the subscription
        b = await subs.subscribe("job-b")
        for seq in (1, 2):
            await fake_redis.publish(
                events_channel("job-a"), Event(seq, EventType.CHUNK, b"x y").encode()
            )
        await fake_redis.publish(events_channel("job-b"), Event(1, EventType.DONE, b"{}").encode())
        assert [(await a.next(1)).seq for _ in range(2)] == [1, 2]
        assert (await b.next(1)).type is EventType.DONE
        await subs.unsubscribe(a)
        await fake_redis.publish(events_channel("job-a"), Event(3, EventType.CHUNK, b"").encode())
        with pytest.raises(TimeoutError):
            await a.next(0.2)
    finally:
        await subs.stop()


async def test_a_sequence_gap_is_reported(fake_redis) -> None:
    subs = Subscriptions(fake_redis)
    await subs.start()
    try:
        sub = await subs.subscribe("job")
        await fake_redis.publish(events_channel("job"), Event(2, EventType.CHUNK, b"").encode())
        with pytest.raises(StreamInterrupted) as info:
            await sub.next(1)
        assert info.value.code == "stream_interrupted"
    finally:
        await subs.stop()


async def test_a_message_of_several_events_is_split_and_ready_takes_what_is_here(
    fake_redis,
) -> None:
    subs = Subscriptions(fake_redis)
    await subs.start()
    try:
        sub = await subs.subscribe("job")
        events = [Event(seq, EventType.CHUNK, b'{"c": "a b"}').encode() for seq in (1, 2, 3)]
        await fake_redis.publish(events_channel("job"), encode_message(events))
        first = await sub.next(1)
        assert first.seq == 1
        assert [e.seq for e in sub.ready()] == [2, 3]
        assert sub.ready() == []
        assert sub.buffered == 0
    finally:
        await subs.stop()


async def test_ready_stops_before_a_gap_and_next_raises_it(fake_redis) -> None:
    subs = Subscriptions(fake_redis)
    await subs.start()
    try:
        sub = await subs.subscribe("job")
        events = [Event(seq, EventType.CHUNK, b"x").encode() for seq in (1, 2, 4)]
        await fake_redis.publish(events_channel("job"), encode_message(events))
        assert (await sub.next(1)).seq == 1
        assert [e.seq for e in sub.ready()] == [2]  # the events before the gap still go out
        with pytest.raises(StreamInterrupted, match="expected #3, got #4"):
            await sub.next(1)
    finally:
        await subs.stop()


async def test_a_resumed_subscription_replays_the_log_then_drops_what_it_held() -> None:
    """Resume after #2: the log (#3, #4, read after subscribing) comes first; live events
    the log already held (#3, #4, and a late STARTED #1) are dropped, #5 follows."""
    from llmq.gateway.events import Subscription

    sub = Subscription("job")
    live = [Event(1, EventType.STARTED, b"w"), *(Event(i, EventType.CHUNK, b"x") for i in (3, 4))]
    sub.queue.put_nowait(encode_message([e.encode() for e in live]))
    sub.buffered += len(live)
    sub.queue.put_nowait(Event(5, EventType.DONE, b"{}").encode())
    sub.buffered += 1
    sub.replay([Event(3, EventType.CHUNK, b"x"), Event(4, EventType.CHUNK, b"x")], after=2)
    got = [await sub.next(1) for _ in range(3)]
    assert [e.seq for e in got] == [3, 4, 5]
    assert sub.buffered == 0


async def test_a_gap_after_the_replay_is_still_reported() -> None:
    from llmq.gateway.events import Subscription

    sub = Subscription("job")
    sub.replay([Event(3, EventType.CHUNK, b"x")], after=2)
    sub.queue.put_nowait(Event(5, EventType.CHUNK, b"x").encode())
    assert (await sub.next(1)).seq == 3
    with pytest.raises(StreamInterrupted):
        await sub.next(1)


async def test_two_followers_of_one_job_each_get_every_event(fake_redis) -> None:
    """A resumed stream (or an Idempotency-Key retry) on the gateway that already follows
    the job: one SUBSCRIBE, both get the events, and one leaving keeps the other's."""
    subs = Subscriptions(fake_redis)
    await subs.start()
    try:
        a = await subs.subscribe("j")
        b = await subs.subscribe("j")
        await fake_redis.publish(events_channel("j"), Event(1, EventType.STARTED, b"w").encode())
        assert (await a.next(2)).seq == 1
        assert (await b.next(2)).seq == 1
        await subs.unsubscribe(a)
        await fake_redis.publish(events_channel("j"), Event(2, EventType.CHUNK, b"x").encode())
        assert (await b.next(2)).seq == 2
        await subs.unsubscribe(b)
        assert await fake_redis.publish(events_channel("j"), b"3 chunk x") == 0
    finally:
        await subs.stop()
