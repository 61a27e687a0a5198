"""The worker's outbox: every job's events go to Redis in shared, pipelined round trips.

A job hands each event to ``put`` and carries on reading the engine; it does not wait for
Redis. One flusher task per process sends whatever is pending in one pipeline, one PUBLISH
per job (a job's pending events joined into one message), and while that round trip is in
flight the next events gather for the next one. So:

- at low load an event goes out at once (the flusher starts on the next loop iteration:
  no timer, no added latency);
- under load the cost per token falls: one pipeline for many jobs, one message for several
  deltas of a job, instead of one awaited PUBLISH per token.

Each flush is a *generation*: ``put`` returns the future of the generation that will carry
the event, resolved with each job's subscriber count (or the Redis error). Publishers
watch it for "nobody listens" and for errors, wait on it for terminal events (the job ends
only once its last event is out), and when more than ``MAX_PENDING`` of their events wait
(Redis slower than the engine: backpressure instead of an unbounded buffer).

A stored job's events (``store: true``) are also appended to its log, in the same pipeline
and before they are published: whatever a subscriber saw, a resumed stream finds. With
MIGRATE on, every other job's non-terminal events are logged the same way, for as long as
the job may run: its progress, which another worker continues from if this one is lost
(``queue.migration``).
"""

from __future__ import annotations

import asyncio
import logging

from llmq.shared.queue.store import Store

logger = logging.getLogger(__name__)

# A job's events waiting for one flush; beyond it the job waits for that flush.
MAX_PENDING = 256
# After a flush that carried events of BUSY_JOBS jobs or more, the next one waits LINGER_S
# first, so that more deltas per job and more jobs share it. A quiet worker (one stream,
# a few) never waits: its flushes carry fewer jobs.
BUSY_JOBS = 8
LINGER_S = 0.002

Generation = asyncio.Future[dict[str, int]]


class Outbox:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.sealer = store.sealer  # the publishers seal their events' data with it
        self._pending: dict[str, list[bytes]] = {}
        self._logged: dict[str, list[tuple[int, bytes]]] = {}
        self._keep: dict[str, int] = {}  # job id -> its log's expiry (ms), when not STORE_TTL_S
        self._generation: Generation | None = None
        self._flusher: asyncio.Task[None] | None = None

    def put(self, job_id: str, event: bytes, log_seq: int = 0, keep_ms: int = 0) -> Generation:
        """Queue one encoded event of ``job_id``; returns the flush that will carry it.
        ``log_seq``: the event's number, to append it to the job's log (0: not logged);
        ``keep_ms``: the log's expiry (0: STORE_TTL_S, a stored job's; -1: left as it is,
        a progress log whose expiry its first event set)."""
        if self._generation is None:
            self._generation = asyncio.get_running_loop().create_future()
        self._pending.setdefault(job_id, []).append(event)
        if log_seq:
            self._logged.setdefault(job_id, []).append((log_seq, event))
            if keep_ms:
                self._keep.setdefault(job_id, keep_ms)  # (a flush's first event sets it)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_all())
        return self._generation

    def pending(self, job_id: str) -> int:
        return len(self._pending.get(job_id, ()))

    async def flushed(self) -> None:
        """Until every event queued so far is out (or its flush failed); the publishers'
        callbacks on that flush have run by then. For tests that need one flush per event."""
        if self._generation is not None:
            await asyncio.wait([self._generation])

    async def _flush_all(self) -> None:
        busy = False
        try:
            while self._pending:
                if busy:  # under load: let a little more gather (see LINGER_S)
                    await asyncio.sleep(LINGER_S)
                batch, self._pending = self._pending, {}
                logged, self._logged = self._logged, {}
                keep, self._keep = self._keep, {}
                generation, self._generation = self._generation, None
                assert generation is not None
                try:
                    counts = await self._store.jobs.publish_many(batch, logged, keep)
                except Exception as exc:  # every job of this flush learns of it
                    if not generation.done():
                        generation.set_exception(exc)
                        generation.exception()  # retrieved: the publishers read it
                else:
                    if not generation.done():
                        generation.set_result(dict(zip(batch, counts, strict=True)))
                busy = len(batch) >= BUSY_JOBS
        finally:
            self._flusher = None
            if self._pending:  # cancelled mid-flush: the next put starts a flusher
                self._pending.clear()
                self._logged.clear()
                self._keep.clear()
            if self._generation is not None and not self._generation.done():
                self._generation.cancel()
                self._generation = None
