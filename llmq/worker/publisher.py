"""Publishes a job's sequence-numbered events through the outbox and notices when nobody
listens any more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from redis.exceptions import RedisError

from llmq.shared.protocol import TERMINAL, Event, EventType
from llmq.worker.outbox import MAX_PENDING, Generation, Outbox

STARTED_WAIT_S = 3.0  # > the gateway's pub/sub reconnect backoff (gateway/events.py)
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 0.5


class ClientGone(Exception):
    """Nobody has listened on the job's channel for longer than the grace period."""


class Publisher:
    def __init__(
        self,
        outbox: Outbox,
        job_id: str,
        orphan_grace_s: float,
        *,
        stored: bool = False,
        unheard: bool = False,
        progress_ms: int = 0,
    ) -> None:
        """``stored``: a ``store: true`` job, whose events are logged and which runs on
        without a listener (it is detached, never ClientGone). ``unheard``: a stored job
        nobody is expected to follow as it starts (a background response): STARTED is
        published once, not again until someone hears it. ``progress_ms`` (MIGRATE on, a
        job not stored): its non-terminal events are logged too, the log kept this long
        (what another worker continues from if this one is lost: ``queue.migration``)."""
        self._outbox = outbox
        self._job_id = job_id
        self._sealer = outbox.sealer
        self._grace = orphan_grace_s
        self._stored = stored
        self._unheard = unheard and stored
        self._progress_ms = 0 if stored else progress_ms
        self._expiry_set = False  # a progress log's expiry: set with its first event
        self._seq = 0
        self._silent_since: float | None = None
        self._gone = False
        self._error: BaseException | None = None
        self._watched: Generation | None = None
        self._announcing: asyncio.Task[None] | None = None
        # The engine's time to this job's first token (a stream's; None: not seen), for
        # the model's measured time to first token (deadlines are predicted with it).
        self.first_token_s: float | None = None

    def announce(self, mark_started: Awaitable[None], worker_id: str) -> None:
        """Start publishing STARTED (event #1) in the background; see ``announced``."""
        self._announcing = asyncio.ensure_future(self._announce(mark_started, worker_id))

    async def _announce(self, mark_started: Awaitable[None], worker_id: str) -> None:
        """Publish STARTED until a subscriber hears it, for at most STARTED_WAIT_S.
        Normally the first one is heard (the gateway subscribes before it enqueues). But a
        gateway whose pub/sub connection was lost re-subscribes its waiting requests only
        once it has reconnected (within about a second of Redis answering again), and a
        worker may start their jobs first: a STARTED that reached nobody is published again
        (same number), so their streams begin at #1 instead of with a gap. When nobody
        comes (the gateway died), the job carries on as before: its silence counts toward
        ORPHAN_GRACE_S from the first STARTED."""
        await mark_started
        event = Event(1, EventType.STARTED, worker_id.encode()).encode()
        first = time.monotonic()
        delay = _RETRY_FIRST_S
        # logged once, however often it is published
        log_seq = 1 if self._stored or self._progress_ms else 0
        while True:
            keep = self._log_expiry() if log_seq else 0
            generation = self._outbox.put(self._job_id, event, log_seq, keep)
            log_seq = 0
            await asyncio.wait([generation])
            heard = _receivers(generation, self._job_id)
            self._seq = 1
            if heard or self._unheard:
                return
            self._silent_since = first
            if time.monotonic() - first >= min(STARTED_WAIT_S, self._grace):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    def _log_expiry(self) -> int:
        """A logged event's ``keep_ms`` (``Outbox.put``): a stored job's log is kept
        STORE_TTL_S from its latest event (0); a progress log's expiry is set once, with
        the first event this worker logs (-1 after that: one command less per flush)."""
        if not self._progress_ms:
            return 0
        if self._expiry_set:
            return -1
        self._expiry_set = True
        return self._progress_ms

    def events(self) -> int:
        """The events published so far (the last one's number)."""
        return self._seq

    def resume_at(self, seq: int) -> None:
        """A migrated job: its client has events up to ``seq`` (STARTED among them); this
        worker's come next, without a STARTED of its own."""
        self._seq = seq

    async def announced(self) -> None:
        """Wait until a subscriber heard STARTED; every later event must follow it."""
        if self._announcing is not None:
            task, self._announcing = self._announcing, None
            await task

    async def send(self, kind: EventType, data: str | bytes) -> None:
        """Queue one event (``data`` without newlines). Raises the Redis error of an earlier
        flush, or ClientGone once flushes have reached no subscriber for longer than the
        grace period; a terminal event never raises ClientGone and returns once it is out."""
        self._raise_if_failed(terminal=kind in TERMINAL)
        self._seq += 1
        raw = data.encode() if isinstance(data, str) else data
        if self._sealer.enabled:  # what reaches Redis is ciphertext (shared.sealing)
            raw = self._sealer.seal_event(self._job_id, raw)
        logged = self._stored or (self._progress_ms and kind not in TERMINAL)
        generation = self._outbox.put(
            self._job_id,
            Event(self._seq, kind, raw).encode(),
            self._seq if logged else 0,
            self._log_expiry() if logged else 0,
        )
        if generation is not self._watched:
            self._watched = generation
            generation.add_done_callback(self._flushed)
        if kind in TERMINAL or self._outbox.pending(self._job_id) >= MAX_PENDING:
            # Out before the job ends, or backpressure. (asyncio.wait: the outcome is read by
            # _flushed, which runs first, not raised here.)
            await asyncio.wait([generation])
            self._raise_if_failed(terminal=kind in TERMINAL)

    def _raise_if_failed(self, *, terminal: bool) -> None:
        if self._error is not None:
            raise self._error
        if self._gone and not terminal and not self._stored:
            raise ClientGone(self._job_id)

    def _flushed(self, generation: Generation) -> None:
        try:
            heard = _receivers(generation, self._job_id)
        except Exception as exc:  # whatever failed the flush fails the job's next send
            self._error = exc
            return
        if heard:
            self._silent_since = None
            return
        now = time.monotonic()
        if self._silent_since is None:
            self._silent_since = now
        elif now - self._silent_since > self._grace:
            self._gone = True


def _receivers(generation: Generation, job_id: str) -> int:
    """How many subscribers a finished flush reached for ``job_id``; raises its error."""
    if generation.cancelled():
        raise RedisError("the worker's outbox stopped")
    exc = generation.exception()
    if exc is not None:
        raise exc
    return generation.result().get(job_id, 0)
