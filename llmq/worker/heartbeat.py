"""Background tasks of a worker: the heartbeat (with engine discovery) and the wake listener."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from llmq.shared.protocol import WAKE_CHANNEL, WorkerInfo
from llmq.worker.job import Runtime

logger = logging.getLogger(__name__)


async def beat_once(rt: Runtime) -> None:
    """Probe the engine, then publish this worker's capacity, load and models."""
    models = await rt.engine.models()
    ready = models is not None
    if ready != rt.engine_ready:
        logger.info("engine at %s is %s", rt.engine.base_url, "ready" if ready else "NOT ready")
    rt.engine_ready = ready
    rt.models = tuple(models or rt.models)
    rt.metrics.engine_up.set(1 if ready else 0)
    s = rt.settings
    info = WorkerInfo(
        worker_id=s.worker_id,
        max_active=s.max_active,
        active=rt.active,
        models=rt.models,
        engine_ready=ready,
        engine_url=rt.engine.base_url,
        started_at=rt.started_at,
    )
    await rt.store.heartbeat(info, s.heartbeat_ttl_s)


async def heartbeat_loop(rt: Runtime) -> None:
    while True:
        try:
            await beat_once(rt)
        except RedisError as exc:
            logger.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(rt.settings.heartbeat_interval_s)


async def wake_listener(rt: Runtime, wake: Callable[[], None]) -> None:
    """Call ``wake()`` for every message on the wake channel; resubscribe after errors.

    Missing a wake-up only costs latency: the worker also re-checks every WAKE_FALLBACK_S.
    """
    while True:
        pubsub = rt.store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(WAKE_CHANNEL)
            wake()  # anything enqueued while we were not subscribed
            async for _message in pubsub.listen():
                wake()
        except RedisError as exc:
            logger.warning("wake listener lost Redis (%s); resubscribing", exc)
            await asyncio.sleep(0.5)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
