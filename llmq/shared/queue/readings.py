"""Readings of the queue and the fleet: what metrics, the registry, the scaling signal and
a waiting client read (never written here; ``Jobs`` and ``Workers`` write). Each script it
runs is defined here; the position script shares ``queue.standing``'s Lua with admission.
``Readings`` is ``Store.readings``."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.protocol import BANDS
from llmq.shared.queue import names
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.queue.standing import QUEUE_CONSTS, QUEUE_LUA

# Waiting jobs per model and band: for each of ``models``, as many numbers as BANDS.
DEPTH = Script(
    keys=(),
    args=("model_prefix",),
    rest="models",
    consts={"SEP": names.BAND_QUEUE_SEP, "BAND_PART": names.BAND_PART, "BANDS": BANDS},
    body="""
local out = {}
for _, m in ipairs(models) do
  for _, band in ipairs(BANDS) do
    local index = model_prefix .. m .. BAND_PART .. band
    local waiting = 0
    for _, tenant in ipairs(redis.call('ZRANGE', index, 0, -1)) do
      waiting = waiting + redis.call('ZCARD', index .. SEP .. tenant)
    end
    table.insert(out, waiting)
  end
end
return out
""",
)


# Hashes of live workers (expired ones are left in the index for the reaper, which needs
# them to find their jobs).
LIVE_WORKERS = Script(
    keys=("workers",),
    args=("worker_prefix",),
    clock=True,
    body="""
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', workers, now, '+inf')) do
  local h = redis.call('HGETALL', worker_prefix .. id)
  if #h > 0 then table.insert(out, h) end
end
return out
""",
)


# Jobs in the queue that are not running (the first ``scan_limit`` looked at).
QUEUE_DEPTH = Script(
    keys=("queue",),
    args=("in_progress_prefix", "scan_limit"),
    body="""
local ids = redis.call('ZRANGE', queue, 0, tonumber(scan_limit) - 1)
local waiting = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', in_progress_prefix .. id) == 0 then waiting = waiting + 1 end
end
return waiting
""",
)


# A waiting job's place in line (1: next) and ETA in ms, or {0, -1} when it is not waiting
# (started, ended, or unknown). ``capacity``: the model's slots (the gateway's registry).
POSITION = Script(
    keys=("band_queue", "admitted", "service"),
    args=("job_id", "bands_prefix", "band", "tenant", "capacity"),
    consts=QUEUE_CONSTS,
    clock=True,
    body=QUEUE_LUA
    + """
local rank = redis.call('ZRANK', band_queue, job_id)
if not rank then return {0, -1} end
local ahead, waiting = queue_view(bands_prefix, band, tenant, rank + 1)
local n = redis.call('ZCOUNT', admitted, '(' .. now, '+inf')
local service_ms = tonumber(redis.call('HGET', service, 'ms')) or 0
return {ahead + 1, eta(ahead + 1, waiting, n, tonumber(capacity), service_ms)}
""",
)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model's load, read at once: admitted jobs (waiting or running), waiting ones by
    band, and the count of its jobs that ever ended (a counter: its rate is the drain
    rate)."""

    in_system: int
    waiting_by_band: dict[str, int]
    done: int

    @property
    def waiting(self) -> int:
        return sum(self.waiting_by_band.values())

    @property
    def running(self) -> int:
        """Admitted and not waiting: started (or being picked)."""
        return max(0, self.in_system - self.waiting)


@dataclass(frozen=True, slots=True)
class Replication:
    """What the primary says of its replicas (INFO replication)."""

    replid: str  # changes when a replica is promoted: a failover
    replicas: int  # connected and online
    max_lag_s: float  # seconds since the slowest replica acknowledged (0: none)


class Readings:
    """The readings (``Store.readings``), their scripts loaded into one client."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue_depth = Registered(redis, QUEUE_DEPTH)
        self._depth = Registered(redis, DEPTH)
        self._live = Registered(redis, LIVE_WORKERS)
        self._position = Registered(redis, POSITION)

    async def position(self, job: p.JobSpec | p.StoredJob, capacity: int) -> tuple[int, int]:
        """A waiting job's place in line (1: next) and expected wait in ms (-1: unknown);
        (0, -1) once it is not waiting (``queue.standing``)."""
        out = await self._position(
            keys={
                "band_queue": names.band_queue_key(job.model, job.band, job.tenant),
                "admitted": names.model_admitted_key(job.model),
                "service": names.model_service_key(job.model),
            },
            args={
                "job_id": job.id,
                "bands_prefix": names.model_bands_prefix(job.model),
                "band": job.band.value,
                "tenant": job.tenant,
                "capacity": capacity,
            },
        )
        return int(out[0]), int(out[1])

    async def ping(self) -> bool:
        """Whether Redis answers (PING)."""
        return bool(await self.redis.ping())

    async def queue_depth(self, scan_limit: int = 100_000) -> int:
        """Jobs in arq's queue not running, every model's (the first ``scan_limit``)."""
        return int(
            await self._queue_depth(
                keys={"queue": names.QUEUE},
                args={"in_progress_prefix": names.IN_PROGRESS_PREFIX, "scan_limit": scan_limit},
            )
        )

    async def depth(self, models: list[str]) -> dict[str, dict[str, int]]:
        """Jobs waiting per model and band."""
        if not models:
            return {}
        out = await self._depth(keys={}, args={"model_prefix": names.MODEL_PREFIX}, rest=models)
        n = len(p.BANDS)
        return {
            m: {band: int(out[i * n + j]) for j, band in enumerate(p.BANDS)}
            for i, m in enumerate(models)
        }

    async def load(self, models: list[str]) -> dict[str, ModelLoad]:
        """Each model's ``ModelLoad``."""
        if not models:
            return {}
        depth = await self.depth(models)
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in models:
                pipe.zcard(names.model_admitted_key(m))
                pipe.get(names.model_done_key(m))
            raw = await pipe.execute()
        return {
            m: ModelLoad(int(raw[2 * i]), depth[m], int(raw[2 * i + 1] or 0))
            for i, m in enumerate(models)
        }

    async def in_system(self, model: str) -> int:
        """The model's admitted jobs not yet finished (N of its bound)."""
        return int(await self.redis.zcard(names.model_admitted_key(model)))

    async def models_seen(self, since_ms: int) -> list[str]:
        """Models a worker served since ``since_ms`` (Unix ms), most recent first."""
        raw = await self.redis.zrevrangebyscore(names.MODELS, "+inf", since_ms)
        return [m.decode() for m in raw]

    async def replication(self) -> Replication:
        info = await self.redis.info("replication")
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online"]  # fmt: skip
        lag = max((float(v.get("lag", 0)) for v in online), default=0.0)
        return Replication(str(info.get("master_replid", "")), len(online), lag)

    async def live_workers(self) -> list[p.WorkerInfo]:
        rows: list[list[bytes]] = await self._live(
            keys={"workers": names.WORKERS}, args={"worker_prefix": names.WORKER_PREFIX}
        )
        out = []
        for row in rows:
            flat = dict(zip(row[::2], row[1::2], strict=True))
            out.append(p.WorkerInfo.from_hash(flat))
        return out
