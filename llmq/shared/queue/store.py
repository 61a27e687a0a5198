"""``Store``: the Redis contract as one process uses it, one connection pool shared by its
parts, each part the owner of its scripts.

    store.jobs      a job's life: admit, cancel, start, release, forget, publish (queue.jobs)
    store.workers   heartbeats, leaving, the reaper, lost claims (queue.workers)
    store.routing   the pick: which waiting jobs a worker starts (queue.routing)
    store.readings  the queue and the fleet read back, a job's position (queue.readings)
    store.records   jobs read back: stored records, logs, payloads (queue.records)
    store.deadlines the sweep of waiting jobs whose deadline passed (queue.waiting)
    store.migration a worker hands a running job over to another (queue.migration)

API keys (``queue.apikeys``) and batches (``queue.batches``) have stores of their own.
"""

from __future__ import annotations

from redis.asyncio import Redis

from llmq.shared.queue.jobs import Jobs
from llmq.shared.queue.migration import Migration
from llmq.shared.queue.readings import Readings
from llmq.shared.queue.records import JobRecords
from llmq.shared.queue.routing import Routing
from llmq.shared.queue.waiting import Deadlines
from llmq.shared.queue.workers import Workers
from llmq.shared.sealing import Sealer


class Store:
    """Typed access to the Redis contract; one per process, sharing a connection pool."""

    def __init__(
        self,
        redis: Redis,
        store_ttl_s: float = 3600.0,
        replicas_ack: int = 0,
        wait_timeout_s: float = 1.0,
        sealer: Sealer | None = None,
        migrate_max: int = 0,
    ) -> None:
        """``store_ttl_s``: STORE_TTL_S; ``replicas_ack``: REDIS_MIN_REPLICAS_ACK, the
        replicas an admission waits for (WAIT, up to ``wait_timeout_s``); ``sealer``:
        PAYLOAD_KEYS (none: payloads plain); ``migrate_max``: the migrations a dead worker's
        job may have had and still be handed over (``Settings.migrations``; 0: none)."""
        self.redis = redis
        self.sealer = sealer or Sealer()
        self.jobs = Jobs(redis, self.sealer, store_ttl_s, replicas_ack, wait_timeout_s)
        self.workers = Workers(redis, store_ttl_s, migrate_max)
        self.routing = Routing(redis)
        self.readings = Readings(redis)
        self.records = JobRecords(redis, self.sealer)
        self.deadlines = Deadlines(redis)
        self.migration = Migration(redis)
