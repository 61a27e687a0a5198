"""One pub/sub connection per gateway, fanning job events out to per-request queues.

A request subscribes to its job's channel and waits for Redis' confirmation *before* the
job is enqueued (pub/sub keeps no backlog). Many requests share one connection, so a
thousand open streams cost one Redis connection, not a thousand.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from llmq.shared.errors import QueueUnavailable, StreamInterrupted
from llmq.shared.protocol import OUT_OF_BAND, Event, events_channel

logger = logging.getLogger(__name__)

_CONFIRM_TIMEOUT_S = 5.0


class Subscription:
    """The events of one job, in order; ``next`` raises TimeoutError or StreamInterrupted."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.channel = events_channel(job_id)
        self.key = self.channel.encode()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._seq = 0

    async def next(self, within: float | None) -> Event:
        # Hot path (once per token): no timer when the event is already here.
        try:
            raw = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            async with asyncio.timeout(within):
                raw = await self.queue.get()
        event = Event.decode(raw)
        if event.seq == OUT_OF_BAND:  # terminal, from the reaper: no place in the sequence
            return event
        if event.seq != self._seq + 1:
            raise StreamInterrupted(
                f"job {self.job_id}: event stream interrupted "
                f"(expected #{self._seq + 1}, got #{event.seq})"
            )
        self._seq = event.seq
        return event


class Subscriptions:
    def __init__(self, redis: Redis) -> None:
        self._pubsub: PubSub = redis.pubsub()
        # Keyed by the channel name as bytes, as messages carry it: no decoding per token.
        self._subs: dict[bytes, Subscription] = {}
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self._reader = asyncio.create_task(self._read(), name="pubsub-reader")

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, job_id: str) -> Subscription:
        sub = Subscription(job_id)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subs[sub.key] = sub
        self._confirm[sub.key] = fut
        try:
            await self._pubsub.subscribe(sub.channel)
            await asyncio.wait_for(fut, _CONFIRM_TIMEOUT_S)
        except TimeoutError:
            await self.unsubscribe(sub)
            raise QueueUnavailable("Redis did not confirm the subscription; retry") from None
        except BaseException:
            await self.unsubscribe(sub)
            raise
        finally:
            self._confirm.pop(sub.key, None)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.key, None) is not None:
            try:
                await self._pubsub.unsubscribe(sub.channel)
            except RedisError as exc:  # stray messages for it are dropped by _dispatch
                logger.warning("job %s: unsubscribe failed: %s", sub.job_id, exc)

    async def _read(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except RedisError as exc:
                logger.warning("pub/sub connection lost: %s; reconnecting", exc)
                await asyncio.sleep(0.2)
                continue
            if msg is not None:
                self._dispatch(msg)

    def _dispatch(self, msg: dict[str, object]) -> None:
        kind = msg["type"]
        channel = msg["channel"]
        if not isinstance(channel, bytes):
            return
        if kind == "message":
            sub = self._subs.get(channel)
            if sub is not None and isinstance(msg["data"], bytes):
                sub.queue.put_nowait(msg["data"])
        elif kind == "subscribe":
            fut = self._confirm.get(channel)
            if fut is not None and not fut.done():
                fut.set_result(None)
