"""Every Lua script of the service, in this package: each step that touches several keys
atomically. ``jobs`` (a job's life), ``pick`` (fair, then cache-aware), ``workers``
(heartbeat, reaper, queue readings), ``batches`` (a batch's).

Each is a ``lua.Script``: its KEYS and ARGV are named in its first lines and passed by name
(``Store``, ``BatchStore`` and ``JobRecords`` are the callers); key prefixes and suffixes,
status codes and statuses come from the Python that owns them (``keys``, ``protocol``,
``batch_records``, ``AdmitStatus`` and ``CancelResult`` here). Times come from Redis' own
clock (``now``), so hosts with different clocks agree. Scripts that build key names inside
Lua (a worker's records, a tenant's queue) need one Redis, not a cluster.
"""

from __future__ import annotations

from llmq.shared.scripts.batches import END, FEED, RESULT
from llmq.shared.scripts.jobs import (
    ADMIT,
    CANCEL,
    FORGET,
    PAYLOAD_SLACK_MS,
    RELEASE,
    SET_METADATA,
    START,
    AdmitStatus,
    CancelResult,
)
from llmq.shared.scripts.pick import PICK
from llmq.shared.scripts.queue import POSITION
from llmq.shared.scripts.workers import (
    DEPTH,
    HEARTBEAT,
    LIVE_WORKERS,
    QUEUE_DEPTH,
    REAP,
    REQUEUE,
)

__all__ = [
    "ADMIT",
    "CANCEL",
    "DEPTH",
    "END",
    "FEED",
    "FORGET",
    "HEARTBEAT",
    "LIVE_WORKERS",
    "PAYLOAD_SLACK_MS",
    "PICK",
    "POSITION",
    "QUEUE_DEPTH",
    "REAP",
    "RELEASE",
    "REQUEUE",
    "RESULT",
    "SET_METADATA",
    "START",
    "AdmitStatus",
    "CancelResult",
]
