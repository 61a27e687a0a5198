"""The worker's outbox and the publisher on top of it (fakeredis pub/sub)."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.store import Store
from llmq.worker import outbox as outbox_module
from llmq.worker.job import relabel
from llmq.worker.outbox import Outbox
from llmq.worker.publisher import ClientGone, Publisher


async def _messages(pubsub) -> list[bytes]:
    out = []
    while (msg := await pubsub.get_message(timeout=0.2)) is not None:
        if msg["type"] == "message":
            out.append(msg["data"])
    return out


async def test_events_ready_together_share_one_message_per_job(store: Store, fake_redis) -> None:
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(names.events_channel("a"), names.events_channel("b"))
    outbox = Outbox(store)
    for seq in (1, 2, 3):  # no await between puts: all go in one flush
        outbox.put("a", p.Event(seq, p.EventType.CHUNK, b"x").encode())
    generation = outbox.put("b", p.Event(1, p.EventType.CHUNK, b"y").encode())
    assert await generation == {"a": 1, "b": 1}  # one subscriber each
    messages = await _messages(pubsub)
    assert [len(p.Event.decode_message(m)) for m in messages] == [3, 1]
    assert [e.seq for e in p.Event.decode_message(messages[0])] == [1, 2, 3]
    await pubsub.aclose()


async def test_an_event_alone_goes_out_at_once(
    store: Store, fake_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stream: no waiting for company. The linger is an hour here: a flush that waited
    for it would never come within the bound; this one carries the event at once."""
    monkeypatch.setattr(outbox_module, "LINGER_S", 3600.0)
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(names.events_channel("a"))
    outbox = Outbox(store)
    event = p.Event(1, p.EventType.CHUNK, b"x").encode()
    generation = outbox.put("a", event)
    assert await asyncio.wait_for(generation, 10) == {"a": 1}  # one subscriber heard it
    assert await _messages(pubsub) == [p.encode_message([event])]
    await pubsub.aclose()


async def test_terminal_events_wait_until_out_and_redis_errors_reach_the_job(store) -> None:
    outbox = Outbox(store)
    pub = Publisher(outbox, "a", orphan_grace_s=10)
    await pub.send(p.EventType.CHUNK, b"x")
    await pub.send(p.EventType.DONE, b"{}")  # returns once flushed
    assert outbox.pending("a") == 0

    async def broken(batch, logged=None, keep=None):
        raise RedisConnectionError("gone")

    store.jobs.publish_many = broken
    with pytest.raises(RedisConnectionError):
        await pub.send(p.EventType.ERROR, b"{}")


async def test_nobody_listening_for_longer_than_the_grace_is_client_gone(store) -> None:
    outbox = Outbox(store)
    pub = Publisher(outbox, "a", orphan_grace_s=0)

    async def publish_to_nobody() -> None:
        for _ in range(10):
            await pub.send(p.EventType.CHUNK, b"x")
            await outbox.flushed()  # each event in a flush of its own

    with pytest.raises(ClientGone):
        await publish_to_nobody()
    await pub.send(p.EventType.DONE, b"{}")  # a terminal event never raises ClientGone


ID = b"chatcmpl-job"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b'{"id":"e-1","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}',
            b'{"id":"chatcmpl-job","choices":[{"index":0,"delta":{"content":"hi"},'
            b'"finish_reason":null}]}',
        ),
        # content that looks like the markers is escaped, so it cannot fool the rewrite
        (
            b'{"id":"e","choices":[{"delta":{"content":"\\"finish_reason\\":\\"stop\\""},'
            b'"finish_reason":null}]}',
            b'{"id":"chatcmpl-job","choices":[{"delta":{"content":"\\"finish_reason\\":'
            b'\\"stop\\""},"finish_reason":null}]}',
        ),
        (b'{"id":"e","choices":[{"delta":{},"finish_reason":"stop"}]}', None),  # finishing
        (b'{"id":"e","choices":[],"usage":{"completion_tokens":2}}', None),  # usage
        (b'{"error":{"message":"x"}}', None),
        (b'{"object":"chat.completion.chunk","id":"e","choices":[]}', None),  # other order
        (b'{"id":"e\\"x","choices":[{"finish_reason":null}]}', None),  # escaped quote in id
        (b'{"id": "e", "choices": [{"finish_reason": null}]}', None),  # not compact
    ],
)
def test_relabel_rewrites_plain_deltas_and_leaves_the_rest_to_json(
    raw: bytes, expected: bytes | None
) -> None:
    out = relabel(raw, ID)
    assert out == expected
    if out is not None:
        assert json.loads(out)["id"] == ID.decode()


async def test_started_is_published_again_until_a_subscriber_hears_it(
    store: Store, fake_redis
) -> None:
    """A gateway re-subscribing after a lost connection may come after the job started:
    its stream must still begin with #1, not with a gap."""
    heard: list[int] = []
    first_out = asyncio.Event()
    publish_many = store.jobs.publish_many

    async def recording(batch, logged=None, keep=None):
        counts = await publish_many(batch, logged)
        heard.extend(counts)
        first_out.set()
        return counts

    store.jobs.publish_many = recording  # type: ignore[method-assign]
    pub = Publisher(Outbox(store), "a", orphan_grace_s=10)

    async def started() -> None:
        return None

    pub.announce(started(), "worker-1")
    await asyncio.wait_for(first_out.wait(), 5)
    assert heard[0] == 0, "the first STARTED went out to nobody"
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(names.events_channel("a"))
    await pub.announced()
    await pub.send(p.EventType.DONE, b"{}")
    events = [e for m in await _messages(pubsub) for e in p.Event.decode_message(m)]
    assert [(e.seq, e.type) for e in events] == [(1, p.EventType.STARTED), (2, p.EventType.DONE)]
    await pubsub.aclose()


async def test_started_heard_by_nobody_for_the_grace_then_chunks_are_client_gone(
    store: Store,
) -> None:
    """Nobody comes (the gateway died): STARTED is retried for the grace (here shorter than
    STARTED_WAIT_S), then the job carries on and its silence counts from the first STARTED."""
    outbox = Outbox(store)
    pub = Publisher(outbox, "a", orphan_grace_s=0.2)

    async def started() -> None:
        return None

    pub.announce(started(), "worker-1")
    await pub.announced()  # returns after the grace: the job carries on

    async def publish_to_nobody() -> None:
        for _ in range(10):
            await pub.send(p.EventType.CHUNK, b"x")
            await outbox.flushed()  # the flush's "nobody" is read before the next send

    with pytest.raises(ClientGone):
        await publish_to_nobody()


async def test_a_stored_job_is_logged_once_and_never_client_gone(store: Store, fake_redis) -> None:
    """store: true: every event is appended to the job's log (STARTED once, however often
    it is published), in order, and nobody listening does not stop the job (detached)."""
    outbox = Outbox(store)
    pub = Publisher(outbox, "s", orphan_grace_s=0.2, stored=True)

    async def started() -> None:
        return None

    pub.announce(started(), "w1")
    await pub.announced()  # nobody listens: published again, logged once
    for _ in range(5):
        await pub.send(p.EventType.CHUNK, b"x")
        await outbox.flushed()  # a flush of its own each: nobody heard any
    await pub.send(p.EventType.DONE, b"{}")
    events = await store.records.read_log("s")
    assert [e.seq for e in events] == list(range(1, 8))
    assert events[0].type is p.EventType.STARTED
    assert [e.seq for e in await store.records.read_log("s", after=5)] == [6, 7]
    assert (last := await store.records.last_logged("s")) is not None
    assert last.type is p.EventType.DONE
    assert await fake_redis.pttl(names.log_key("s")) > 0
    assert not await fake_redis.exists(names.log_key("unstored"))


async def test_a_background_job_publishes_started_once_and_goes_on(store: Store) -> None:
    """A background response: nobody follows it as it starts (its log serves whoever comes
    later), so STARTED goes out once and the job does not wait for a listener (with the
    grace and STARTED_WAIT_S far away, a retry would hold ``announced`` for seconds)."""
    flushes: list[dict[str, list[bytes]]] = []
    publish_many = store.jobs.publish_many

    async def recording(batch, logged=None, keep=None):
        flushes.append(dict(batch))
        return await publish_many(batch, logged)

    store.jobs.publish_many = recording  # type: ignore[method-assign]
    pub = Publisher(Outbox(store), "bg", orphan_grace_s=3600, stored=True, unheard=True)

    async def started() -> None:
        return None

    pub.announce(started(), "w1")
    await asyncio.wait_for(pub.announced(), 10)
    await pub.send(p.EventType.DONE, b"{}")
    kinds = [p.Event.decode(e).type for f in flushes for e in f["bg"]]
    assert kinds == [p.EventType.STARTED, p.EventType.DONE]
    assert [e.seq for e in await store.records.read_log("bg")] == [1, 2]
