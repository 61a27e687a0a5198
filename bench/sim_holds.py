"""The engine simulator's holds: named gates a test opens (release) or breaks (fail), so
that it decides when a job ends instead of racing durations (``bench.engine_sim``)."""

from __future__ import annotations

import asyncio


class DroppedStream(Exception):
    """Raised inside a stream to cut the connection mid-way (fault injection)."""


class Holds:
    """Named gates: ``wait(name)`` blocks until ``release(name)`` or ``fail(name)``."""

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self._failed: set[str] = set()
        self.held: dict[str, int] = {}

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    async def wait(self, name: str) -> None:
        """Returns when released; raises DroppedStream when failed."""
        self.held[name] = self.held.get(name, 0) + 1
        try:
            await self._gate(name).wait()
        finally:
            self.held[name] -= 1
            if not self.held[name]:
                del self.held[name]
        if name in self._failed:
            raise DroppedStream(name)

    def release(self, name: str) -> None:
        self._gate(name).set()

    def fail(self, name: str) -> None:
        self._failed.add(name)
        self._gate(name).set()
