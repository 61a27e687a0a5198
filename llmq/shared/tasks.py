"""Helpers for the long-running asyncio tasks of both processes."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    Call it in a background loop's ``except`` for library errors: when a task is cancelled
    just as a command's own timeout fires, the timeout can win and the cancellation surface
    as a redis ``TimeoutError`` instead (seen on a loaded machine: a gateway whose registry
    loop caught it, slept on, and never finished shutting down).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def log_failure(task: asyncio.Task[None]) -> None:
    """Done-callback for fire-and-forget tasks: a failure is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())


async def stop_task(task: asyncio.Task[None], within: float, what: str) -> None:
    """Cancel ``task`` and wait for it, at most ``within`` seconds (shutdown must end)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        logger.warning("%s did not stop within %.0fs; leaving it", what, within)
