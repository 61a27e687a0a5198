"""Regression: after the gateway sat idle past redis-py's health-check interval, the next
SUBSCRIBE read the health check's PING reply itself, racing the pub/sub reader
("read() called while another coroutine is already waiting"): one request in a few got a
500. The pub/sub connection now has no redis-py health check; the reader pings itself."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from llmq.gateway.app import build_state
from llmq.shared.protocol import Event, EventType
from llmq.shared.queue.names import events_channel
from llmq.shared.queue.pubsub import PING_S
from llmq.shared.settings import Settings
from tests.support.stack import Proc

pytestmark = pytest.mark.integration


async def test_subscribing_after_an_idle_spell_never_races_the_reader(
    redis_server: Proc,
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    st = build_state(Settings(redis_url=url))
    assert not st.subs.redis.connection_pool.connection_kwargs.get("health_check_interval")
    publisher = Redis.from_url(url)
    await st.subs.start()
    try:
        warm = await st.subs.subscribe("warm")
        await st.subs.unsubscribe(warm)
        # Idle with no subscription, past the reader's own PINGs: the state that broke.
        await asyncio.sleep(PING_S * 2.5)
        subs = await asyncio.gather(*(st.subs.subscribe(f"idle-{i}") for i in range(50)))
        for i in range(50):
            event = Event(1, EventType.DONE, b"{}").encode()
            await publisher.publish(events_channel(f"idle-{i}"), event)
        events = await asyncio.gather(*(s.next(10) for s in subs))
        assert [e.type for e in events] == [EventType.DONE] * 50
    finally:
        await st.subs.stop()
        await st.subs.redis.aclose()
        await st.redis.aclose()
        await publisher.aclose()
