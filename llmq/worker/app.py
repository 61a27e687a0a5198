"""Builds the arq worker: JSON jobs, MAX_ACTIVE slots, woken by pub/sub instead of polled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker
from prometheus_client import start_http_server
from redis.asyncio import ConnectionPool

from llmq.shared import protocol
from llmq.shared.settings import Settings
from llmq.shared.store import Store
from llmq.worker.engine import EngineClient
from llmq.worker.heartbeat import beat_once, heartbeat_loop, wake_listener
from llmq.worker.job import Runtime, chat
from llmq.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class WakeableWorker(Worker):
    """arq's Worker, woken instead of polled.

    arq's main loop calls ``_poll_iteration`` every ``poll_delay`` (0.5 s by default), which
    would add up to half a second to time-to-first-token. Here ``poll_delay`` is 0 and each
    iteration first waits for a wake-up: a message on ``llmq:wake`` (a job was enqueued or an
    abort requested) or a slot freeing, with WAKE_FALLBACK_S as a safety net.

    arq's iteration also reads the first 100 queue entries and tries each, running ones
    included (arq keeps running jobs in the queue): three Redis round trips per running job
    before it reaches a waiting one, tens of milliseconds with a few dozen slots busy. Here
    one Lua call returns only the waiting jobs, as many as there are free slots. The rest of
    the iteration (aborts, finished tasks, arq's health key) is arq's, step by step. These
    overrides use arq internals (0.26-0.28); the version range in pyproject pins them.
    """

    def __init__(self, *args: Any, wake_fallback_s: float, **kwargs: Any) -> None:
        super().__init__(*args, poll_delay=0, **kwargs)
        self._wake_event = asyncio.Event()
        self._wake_event.set()
        self._fallback_s = wake_fallback_s

    def wake(self) -> None:
        self._wake_event.set()

    async def _poll_iteration(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake_event.wait(), self._fallback_s)
        self._wake_event.clear()
        free = self.max_jobs - self.job_counter
        if self.allow_pick_jobs and free > 0:
            store: Store = self.ctx["runtime"].store
            await self.start_jobs(await store.waiting_jobs(free))
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq does: errors in run_job surface here
        await self.heart_beat()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.wake()  # a slot is free: look at the queue again now

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        # Stop advertising capacity at once so gateways stop admitting for this worker.
        runtime: Runtime = self.ctx["runtime"]
        for task in self.ctx.get("background", []):
            task.cancel()
        self.loop.create_task(runtime.store.remove_worker(runtime.settings.worker_id))
        super().handle_sig_wait_for_completion(signum)


async def _on_startup(ctx: dict[str, Any]) -> None:
    rt: Runtime = ctx["runtime"]
    worker: WakeableWorker = ctx["worker"]
    await beat_once(rt)
    ctx["background"] = [
        asyncio.create_task(heartbeat_loop(rt), name="heartbeat"),
        asyncio.create_task(wake_listener(rt, worker.wake), name="wake-listener"),
    ]
    logger.info(
        "worker %s ready: %d slots, engine %s (%s)",
        rt.settings.worker_id,
        rt.settings.max_active,
        rt.engine.base_url,
        "ready" if rt.engine_ready else "not ready",
    )


async def _on_shutdown(ctx: dict[str, Any]) -> None:
    rt: Runtime = ctx["runtime"]
    for task in ctx.get("background", []):
        task.cancel()
    await asyncio.gather(*ctx.get("background", []), return_exceptions=True)
    await rt.store.remove_worker(rt.settings.worker_id)
    await rt.engine.aclose()
    logger.info("worker %s stopped", rt.settings.worker_id)


def build_worker(
    settings: Settings, *, engine: EngineClient | None = None, handle_signals: bool = True
) -> WakeableWorker:
    """The worker factory: everything comes from ``settings``."""
    redis = ArqRedis(
        ConnectionPool.from_url(settings.redis_url, health_check_interval=30),
        job_serializer=protocol.json_dumps,
        job_deserializer=protocol.json_loads,
        default_queue_name=protocol.QUEUE,
    )
    metrics = WorkerMetrics()
    metrics.max_active.set(settings.max_active)
    runtime = Runtime(
        settings=settings,
        store=Store(redis),
        engine=engine
        or EngineClient(
            settings.vllm_url, max_connections=settings.max_active, api_key=settings.vllm_api_key
        ),
        metrics=metrics,
    )
    grace = settings.request_timeout_s + settings.orphan_grace_s
    worker = WakeableWorker(
        functions=[chat],
        queue_name=protocol.QUEUE,
        redis_pool=redis,
        max_jobs=settings.max_active,
        job_timeout=grace + 5,
        keep_result=protocol.RESULT_TTL_S,
        max_tries=1,  # a job streams to one client once; a re-run would replay its tokens
        retry_jobs=False,
        allow_abort_jobs=True,
        job_serializer=protocol.json_dumps,
        job_deserializer=protocol.json_loads,
        handle_signals=handle_signals,
        job_completion_wait=max(1, int(settings.drain_timeout_s)),
        health_check_interval=60,
        on_startup=_on_startup,
        on_shutdown=_on_shutdown,
        ctx={"runtime": runtime},
        wake_fallback_s=settings.wake_fallback_s,
    )
    worker.ctx["worker"] = worker
    return worker


def serve_metrics(worker: WakeableWorker, port: int) -> None:
    if port:
        runtime: Runtime = worker.ctx["runtime"]
        start_http_server(port, registry=runtime.metrics.registry)
