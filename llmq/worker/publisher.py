"""Publishes a job's sequence-numbered events and notices when nobody listens any more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from llmq.shared.protocol import Event, EventType
from llmq.shared.store import Store


class ClientGone(Exception):
    """Nobody has listened on the job's channel for longer than the grace period."""


class Publisher:
    def __init__(self, store: Store, job_id: str, orphan_grace_s: float) -> None:
        self._store = store
        self._job_id = job_id
        self._grace = orphan_grace_s
        self._seq = 0
        self._silent_since: float | None = None
        self._announcing: asyncio.Task[None] | None = None

    def announce(self, mark_started: Awaitable[None], worker_id: str) -> None:
        """Start publishing STARTED (event #1) in the background; see ``announced``."""

        async def run() -> None:
            await mark_started
            await self.send(EventType.STARTED, worker_id)

        self._announcing = asyncio.ensure_future(run())

    async def announced(self) -> None:
        """Wait for STARTED to be out; every later event must follow it."""
        if self._announcing is not None:
            task, self._announcing = self._announcing, None
            await task

    async def send(self, kind: EventType, data: str) -> None:
        """Publish one event. Raises ClientGone once PUBLISH has reached no subscriber for
        longer than the grace period (the client is gone); a terminal event never raises."""
        self._seq += 1
        receivers = await self._store.publish(self._job_id, Event(self._seq, kind, data.encode()))
        if receivers:
            self._silent_since = None
            return
        now = time.monotonic()
        if self._silent_since is None:
            self._silent_since = now
        elif now - self._silent_since > self._grace:
            raise ClientGone(self._job_id)
