"""Redis failing over or going away: what each process does, and the pieces they share.

The map (each part lives with the code it guards):

- Sentinel names a new primary, a demoted server answers READONLY: ``queue/connections.py``
  (a ``SentinelConnectionPool`` asks the sentinels on each new connection and drops a
  READONLY one).
- An admission must survive a failover (REDIS_MIN_REPLICAS_ACK): ``Jobs.admit`` (WAIT on
  the admit script's connection, ``not_replicated`` here); ``confirm_replicated`` here for
  batches and files.
- A pub/sub connection dies silently (a frozen or vanished primary): ``queue/pubsub.py``
  (``listen``: PING, then lost); ``gateway/events.py`` (reconnect, re-subscribe, fail the
  waiting requests); ``worker/heartbeat.py`` (the wake listener).
- Commands fail while Redis is away: ``gateway/error_handlers.py`` (503);
  ``gateway/registry.py`` (no live workers: 503 before admission); ``worker/arq_worker.py``
  (the poll loop backs off); ``worker/job.py`` (a job that ended meanwhile is kept in
  ``Runtime.unreleased`` and forgotten on return by ``Jobs.forget``).
- Workers could not beat while this process could not reach Redis: ``OutageReaper`` here
  (no reap until they had a heartbeat's time to beat again), run by the gateway's registry
  and the worker's heartbeat.
- A failover happened: ``Readings.replication`` (the primary's replication id) and
  ``gateway/app.py`` (``api_redis_failovers_total``, the replica gauges).
- Events published on the old primary were lost: ``gateway/events.py`` (sequence gaps),
  ``gateway/relay.py`` (``StreamInterrupted``).

Measured end to end by ``bench/failover.py`` and ``tests/chaos/test_failover.py``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from llmq.shared.errors import QueueUnavailable
from llmq.shared.queue import names

if TYPE_CHECKING:
    from llmq.shared.queue.workers import Workers


async def confirm_replicated(redis: Redis, replicas: int, timeout_s: float) -> None:
    """Wait until ``replicas`` replicas hold every write this process made so far; raise
    QueueUnavailable when they do not within ``timeout_s``. WAIT counts the replicas that
    reached its own connection's last write, and replication is one ordered stream: a
    marker written on this connection, then WAIT, covers the writes of every connection
    before it."""
    if replicas <= 0:
        return
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(names.REPLICATION_MARK, "1", px=60_000)
        pipe.wait(replicas, max(1, int(timeout_s * 1000)))
        _, acked = await pipe.execute()
    if int(acked) < replicas:
        raise not_replicated(int(acked), replicas, timeout_s)


def not_replicated(acked: int, replicas: int, timeout_s: float) -> QueueUnavailable:
    return QueueUnavailable(
        f"not acknowledged by {replicas} Redis replica(s) within {timeout_s:g}s "
        f"({acked} did): nothing was started; retry"
    )


class OutageReaper:
    """The reaper as a process runs it after each of its Redis round trips (the gateway's
    registry refresh, the worker's heartbeat).

    After this process could not reach Redis (an outage, a failover), the workers could not
    beat either: their heartbeats may have expired meanwhile. So once Redis answers again,
    nobody is reaped until ``grace_s`` (HEARTBEAT_TTL_S: a heartbeat's time) has passed."""

    def __init__(self, workers: Workers, grace_s: float, logger: logging.Logger) -> None:
        self._workers, self._grace_s, self._logger = workers, grace_s, logger
        self._after = 0.0  # monotonic time from which reaping resumes

    def redis_back(self) -> None:
        """Redis answered after failing: give the workers their time to beat."""
        self._after = time.monotonic() + self._grace_s

    async def reap(self) -> None:
        """Reap dead workers' jobs, unless within the grace after an outage."""
        if time.monotonic() < self._after:
            return
        dead, jobs, migrated = await self._workers.reap()
        if dead:
            self._logger.warning(
                "worker(s) %s lost their heartbeat: %d started job(s) ended with worker_lost, "
                "%d handed over to other workers",
                ", ".join(dead),
                jobs,
                migrated,
            )
