"""Readings of the queue and the fleet: what metrics, the registry and the scaling signal
read (never written here; ``Store`` writes)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from llmq.shared import keys, scripts
from llmq.shared import protocol as p
from llmq.shared.lua import Registered


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
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue_depth = Registered(redis, scripts.QUEUE_DEPTH)
        self._depth = Registered(redis, scripts.DEPTH)
        self._live = Registered(redis, scripts.LIVE_WORKERS)
        self._position = Registered(redis, scripts.POSITION)

    async def position(self, job: p.JobSpec | p.StoredJob, capacity: int) -> tuple[int, int]:
        """A waiting job's place in line (1: next) and expected wait in ms (-1: unknown);
        (0, -1) once it is not waiting (``scripts.queue``)."""
        out = await self._position(
            keys={
                "band_queue": keys.band_queue_key(job.model, job.band, job.tenant),
                "admitted": keys.model_admitted_key(job.model),
                "service": keys.model_service_key(job.model),
            },
            args={
                "job_id": job.id,
                "bands_prefix": keys.model_bands_prefix(job.model),
                "band": job.band.value,
                "tenant": job.tenant,
                "capacity": capacity,
            },
        )
        return int(out[0]), int(out[1])

    async def queue_depth(self, scan_limit: int = 100_000) -> int:
        """Jobs in arq's queue not running, every model's (the first ``scan_limit``)."""
        return int(
            await self._queue_depth(
                keys={"queue": keys.QUEUE},
                args={"in_progress_prefix": keys.IN_PROGRESS_PREFIX, "scan_limit": scan_limit},
            )
        )

    async def depth(self, models: list[str]) -> dict[str, dict[str, int]]:
        """Jobs waiting per model and band."""
        if not models:
            return {}
        out = await self._depth(keys={}, args={"model_prefix": keys.MODEL_PREFIX}, rest=models)
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
                pipe.zcard(keys.model_admitted_key(m))
                pipe.get(keys.model_done_key(m))
            raw = await pipe.execute()
        return {
            m: ModelLoad(int(raw[2 * i]), depth[m], int(raw[2 * i + 1] or 0))
            for i, m in enumerate(models)
        }

    async def in_system(self, model: str) -> int:
        """The model's admitted jobs not yet finished (N of its bound)."""
        return int(await self.redis.zcard(keys.model_admitted_key(model)))

    async def models_seen(self, since_ms: int) -> list[str]:
        """Models a worker served since ``since_ms`` (Unix ms), most recent first."""
        raw = await self.redis.zrevrangebyscore(keys.MODELS, "+inf", since_ms)
        return [m.decode() for m in raw]

    async def replication(self) -> Replication:
        info = await self.redis.info("replication")
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online"]  # fmt: skip
        lag = max((float(v.get("lag", 0)) for v in online), default=0.0)
        return Replication(str(info.get("master_replid", "")), len(online), lag)

    async def live_workers(self) -> list[p.WorkerInfo]:
        rows: list[list[bytes]] = await self._live(
            keys={"workers": keys.WORKERS}, args={"worker_prefix": keys.WORKER_PREFIX}
        )
        out = []
        for row in rows:
            flat = dict(zip(row[::2], row[1::2], strict=True))
            out.append(p.WorkerInfo.from_hash(flat))
        return out
