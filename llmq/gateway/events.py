"""One pub/sub connection per gateway, fanning job events out to per-request queues.

A request subscribes to its job's channel and waits for Redis' confirmation *before* the
job is enqueued (pub/sub keeps no backlog). Many requests share one connection, so a
thousand open streams cost one Redis connection, not a thousand.

The connection is supervised by its one reader task:
- Only the reader reads. redis-py's ``health_check_interval`` must be off on this
  connection: its check makes whichever coroutine sends the next command (a request's
  SUBSCRIBE) also *read* the PING reply, racing the reader ("read() called while another
  coroutine is already waiting"): after an idle spell, one request in a few got a 500.
  Liveness is checked by the reader itself instead (``shared.queue.pubsub.listen``, as the
  worker's wake listener does): when the connection has been silent
  for ``PING_S`` it sends PING, and no answer within ``DEAD_AFTER_S`` counts as lost (a
  frozen Redis never closes the socket).
- When the connection is lost, subscriptions that have seen events fail at once with
  ``queue_unavailable`` (events may have been lost; their clients get an error event), and
  subscriptions still waiting for their job to start are kept and re-subscribed on a fresh
  connection: no job can start while Redis is away, so nothing of theirs was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from llmq.shared.errors import QueueUnavailable, ServiceError, StreamInterrupted
from llmq.shared.protocol import OUT_OF_BAND, Event
from llmq.shared.queue.names import events_channel
from llmq.shared.queue.pubsub import connection_errors, listen
from llmq.shared.sealing import Sealer
from llmq.shared.tasks import stop_if_cancelled, stop_task

logger = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 2.0
_CONNECT_TIMEOUT_S = 2.0  # one reconnection try (connect, handshake, re-subscribe)
_COMMAND_TIMEOUT_S = 1.0  # an UNSUBSCRIBE's send
_BACKOFF_MAX_S = 1.0  # < the worker's STARTED_WAIT_S: a waiting request is back in time
_LOST = b""  # queued to a subscription whose events may have been lost
# Events buffered per stream while its client reads slower than the engine writes. Beyond
# it the stream is dropped (its job stops: nobody listens), so memory stays bounded.
MAX_BUFFERED_EVENTS = 4096


class Subscription:
    """The events of one job, in order; ``next`` raises TimeoutError, StreamInterrupted
    (a sequence gap) or QueueUnavailable (the connection to Redis was lost). One pub/sub
    message may carry several events (the worker coalesces them). Sealed event data is
    opened here (``shared.sealing``; a payload no key opens raises PayloadUndecryptable)."""

    def __init__(self, job_id: str, sealer: Sealer | None = None) -> None:
        self.job_id = job_id
        self._sealer = sealer or Sealer()
        self.channel = events_channel(job_id)
        self.key = self.channel.encode()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()  # bounded by ``buffered``
        self.buffered = 0  # events received and not yet taken
        self.overflowed = False
        self._events: deque[Event] = deque()  # decoded from the current message
        self._deferred: ServiceError | None = None  # a problem met by ``ready``
        self._seq = 0
        self._resumed = False  # see ``replay``

    @property
    def heard(self) -> bool:
        """Whether any event of the job arrived (it started)."""
        return self._seq > 0

    async def next(self, within: float | None) -> Event:
        event = self._take()
        if event is None:
            async with asyncio.timeout(within):
                while event is None:  # (a message of replayed events only: wait on)
                    raw = await self.queue.get()
                    self._decode(raw)
                    event = self._take()
        return event

    def replay(self, logged: list[Event], after: int) -> None:
        """Resume a stored job's stream after event ``after``: ``logged`` (its log from
        there, read *after* this subscription was confirmed) comes first, then live
        events; those the log already held (numbered up to the last one taken) are
        dropped, so nothing is missed and nothing doubled."""
        self._resumed = True
        self._seq = after
        self._events.extendleft(reversed(logged))
        self.buffered += len(logged)

    def ready(self, limit: int = 256) -> list[Event]:
        """Up to ``limit`` more events that are already here, without waiting. A problem
        (lost events, a gap) ends the list and is raised by the next ``next``."""
        out: list[Event] = []
        try:
            while len(out) < limit and (event := self._take()) is not None:
                out.append(event)
        except ServiceError as exc:
            self._deferred = exc
        return out

    def _take(self) -> Event | None:
        """The next event if one is here (decoding a queued message if needed), else None."""
        if self._deferred is not None:
            raise self._deferred
        if self.overflowed:
            raise StreamInterrupted(
                f"job {self.job_id}: the client read too slowly; "
                f"more than {MAX_BUFFERED_EVENTS} events were waiting"
            )
        while True:
            if not self._events:
                try:
                    raw = self.queue.get_nowait()  # hot path: no timer when it is here
                except asyncio.QueueEmpty:
                    return None
                self._decode(raw)
            event = self._events.popleft()
            self.buffered -= 1
            if event.seq == OUT_OF_BAND:  # terminal, from the reaper: no place in the sequence
                return event
            if self._resumed and event.seq <= self._seq:  # live, and already replayed
                continue
            if event.seq != self._seq + 1:
                raise StreamInterrupted(
                    f"job {self.job_id}: event stream interrupted "
                    f"(expected #{self._seq + 1}, got #{event.seq})"
                )
            self._seq = event.seq
            return event

    def _decode(self, raw: bytes) -> None:
        if raw is _LOST:
            raise QueueUnavailable("lost the connection to Redis mid-stream; retry")
        self._events.extend(
            self._sealer.open_event(self.job_id, e) for e in Event.decode_message(raw)
        )


class Subscriptions:
    def __init__(self, redis: Redis, sealer: Sealer | None = None) -> None:
        """``redis`` must not have ``health_check_interval`` set (see the module docstring).
        ``sealer``: opens the events' sealed data (PAYLOAD_KEYS)."""
        self.redis = redis
        self.sealer = sealer or Sealer()
        self._pubsub: PubSub = redis.pubsub()
        # Keyed by the channel name as bytes, as messages carry it: no decoding per token.
        # Usually one subscription per channel; a resumed stream or an Idempotency-Key
        # retry may follow the same job on this gateway too (one SUBSCRIBE for all).
        self._subs: dict[bytes, list[Subscription]] = {}
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    def __len__(self) -> int:
        """Jobs followed: this gateway's streams (and waits) now."""
        return len(self._subs)

    async def start(self) -> None:
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self.connected.set()
        self._reader = asyncio.create_task(self._read(), name="pubsub-reader")

    async def stop(self) -> None:
        if self._reader:
            await stop_task(self._reader, 2.0, "the pub/sub reader")
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, job_id: str) -> Subscription:
        if not self.connected.is_set():
            raise QueueUnavailable("the connection to Redis is being re-established; retry")
        sub = Subscription(job_id, self.sealer)
        followers = self._subs.get(sub.key)
        if followers is not None:  # subscribed already: share it (and its confirmation)
            followers.append(sub)
            fut = self._confirm.get(sub.key)
        else:
            self._subs[sub.key] = [sub]
            fut = asyncio.get_running_loop().create_future()
            self._confirm[sub.key] = fut
        try:
            if followers is None:
                with connection_errors():
                    await self._pubsub.subscribe(sub.channel)
            if fut is not None:  # shielded: another follower may be waiting on it too
                await asyncio.wait_for(asyncio.shield(fut), CONFIRM_TIMEOUT_S)
        except TimeoutError:
            await self.unsubscribe(sub)
            raise QueueUnavailable("Redis did not confirm the subscription; retry") from None
        except BaseException:
            await self.unsubscribe(sub)
            raise
        finally:
            if fut is not None and self._confirm.get(sub.key) is fut and fut.done():
                del self._confirm[sub.key]
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        followers = self._subs.get(sub.key)
        if followers is None or sub not in followers:
            return
        followers.remove(sub)
        if followers:
            return
        del self._subs[sub.key]
        fut = self._confirm.pop(sub.key, None)
        if fut is not None and not fut.done():
            fut.cancel()
        if not self.connected.is_set():
            # Lost: the fresh connection never subscribed it (it left ``_subs`` before the
            # reconnect's SUBSCRIBE, or that SUBSCRIBE's stray messages are dropped by
            # _dispatch). Connecting here would wait for a frozen Redis to answer the
            # handshake: a request answered only when Redis came back (regression).
            return
        try:
            async with asyncio.timeout(_COMMAND_TIMEOUT_S):
                with connection_errors():
                    await self._pubsub.unsubscribe(sub.channel)
        except (RedisError, OSError, TimeoutError) as exc:  # strays dropped by _dispatch
            logger.warning("job %s: unsubscribe failed: %s", sub.job_id, exc)

    async def _read(self) -> None:
        while True:
            try:
                await self._pump()
            except (RedisError, OSError) as exc:
                stop_if_cancelled()
                logger.warning("pub/sub connection lost (%s); reconnecting", exc)
                await self._lost()
                backoff = 0.1
                while not await self._reconnect():
                    await asyncio.sleep(backoff)
                    backoff = min(_BACKOFF_MAX_S, backoff * 2)

    async def _pump(self) -> None:
        """Read and dispatch until the connection fails or stops answering PING."""
        await listen(self._pubsub, self._dispatch)

    async def _lost(self) -> None:
        """Fail the subscriptions that may have missed events; start a fresh connection."""
        self.connected.clear()
        old, self._pubsub = self._pubsub, self.redis.pubsub()
        with contextlib.suppress(RedisError, OSError):  # the socket is closed either way
            await old.aclose()  # type: ignore[no-untyped-call]
        for key, followers in list(self._subs.items()):
            for sub in [f for f in followers if f.heard]:
                followers.remove(sub)
                sub.queue.put_nowait(_LOST)
            if not followers:
                del self._subs[key]
        for fut in self._confirm.values():
            if not fut.done():
                fut.set_exception(QueueUnavailable("lost the connection to Redis; retry"))

    async def _reconnect(self) -> bool:
        """Connect the fresh pub/sub and re-subscribe the jobs still waiting to start; a
        try is bounded (the handshake waits for replies: a frozen Redis accepts the TCP
        connection and answers nothing) and a failed one leaves a fresh PubSub behind."""
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                with connection_errors():
                    await self._pubsub.connect()  # type: ignore[no-untyped-call]
                if self._subs:
                    channels = (subs[0].channel for subs in self._subs.values())
                    with connection_errors():
                        await self._pubsub.subscribe(*channels)
        except (RedisError, OSError, TimeoutError) as exc:
            stop_if_cancelled()
            logger.info("Redis still unreachable: %s", exc or "no answer")
            old, self._pubsub = self._pubsub, self.redis.pubsub()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                    await old.aclose()  # type: ignore[no-untyped-call]
            return False
        self.connected.set()
        logger.info("pub/sub reconnected; %d waiting job(s) re-subscribed", len(self._subs))
        return True

    def _overflow(self, sub: Subscription) -> None:
        """Stop listening for a stream whose client does not keep up: its worker then sees
        nobody listening and stops the job after ORPHAN_GRACE_S."""
        logger.warning("job %s: client too slow, dropping its stream", sub.job_id)
        sub.overflowed = True
        task = asyncio.get_running_loop().create_task(self.unsubscribe(sub))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _dispatch(self, msg: dict[str, object]) -> None:
        kind = msg["type"]
        channel = msg["channel"]
        if not isinstance(channel, bytes):
            return  # a PING reply
        if kind == "message":
            data = msg["data"]
            if not isinstance(data, bytes):
                return
            for sub in self._subs.get(channel, ()):
                if sub.overflowed:
                    continue
                sub.buffered += data.count(b"\n") + 1
                if sub.buffered > MAX_BUFFERED_EVENTS:
                    self._overflow(sub)
                else:
                    sub.queue.put_nowait(data)
        elif kind == "subscribe":
            fut = self._confirm.get(channel)
            if fut is not None and not fut.done():
                fut.set_result(None)
