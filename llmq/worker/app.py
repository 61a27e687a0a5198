"""Builds the worker: JSON jobs, MAX_ACTIVE slots, woken by pub/sub instead of polled."""

from __future__ import annotations

import logging

from arq.connections import ArqRedis
from arq.worker import Worker
from prometheus_client import start_http_server

from llmq.shared import protocol
from llmq.shared.queue import names
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.connections import redis_pool
from llmq.shared.queue.routing import Affinity
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from llmq.worker.arq_worker import WakeableWorker, seam_problems
from llmq.worker.engine import EngineClient
from llmq.worker.job import chat
from llmq.worker.metrics import WorkerMetrics
from llmq.worker.outbox import Outbox
from llmq.worker.runtime import Runtime

logger = logging.getLogger(__name__)


def build_worker(
    settings: Settings, *, engine: EngineClient | None = None, handle_signals: bool = True
) -> WakeableWorker:
    """The worker factory: everything comes from ``settings``.

    Refuses to build on an arq whose members this service relies on have changed (names
    and signatures; the unit tests also compare their source).
    """
    problems = seam_problems(Worker, check_source=False)
    if problems:
        raise RuntimeError("incompatible arq version: " + "; ".join(problems))
    redis = ArqRedis(
        redis_pool(settings, timeout=settings.redis_timeout_s),
        job_serializer=protocol.json_dumps,
        job_deserializer=protocol.json_loads,
        default_queue_name=names.QUEUE,
    )
    metrics = WorkerMetrics()
    sealer = settings.sealer(metrics.undecryptable.inc)
    store = Store(redis, settings.store_ttl_s, sealer=sealer, migrate_max=settings.migrations)
    runtime = Runtime(
        settings=settings,
        store=store,
        batches=BatchStore(redis, settings.file_ttl_s, sealer=sealer),
        outbox=Outbox(store),
        engine=engine
        or EngineClient(
            settings.vllm_url,
            max_connections=settings.max_active,
            api_key=settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None,
        ),
        metrics=metrics,
        affinity=Affinity(
            settings.affinity_max_wait_ms, settings.affinity_record_max, settings.affinity_ttl_s
        )
        if settings.prefix_affinity
        else None,
    )
    metrics.max_active.set(runtime.capacity)
    grace = settings.request_timeout_s + settings.orphan_grace_s
    return WakeableWorker(
        runtime,
        functions=[chat],
        queue_name=names.QUEUE,
        redis_pool=redis,
        max_jobs=settings.max_active,
        job_timeout=grace + 5,
        # arq's result repeats the job's arguments (the prompt): keep none; the release
        # script leaves llmq:outcome:<id> instead.
        keep_result=0,
        # A job streams to one client once: arq never runs it again (a migrated job is
        # continued, not re-run: queue.migration resets arq's try counter).
        max_tries=1,
        retry_jobs=False,
        allow_abort_jobs=True,
        job_serializer=protocol.json_dumps,
        job_deserializer=protocol.json_loads,
        handle_signals=handle_signals,
        job_completion_wait=max(1, int(settings.drain_timeout_s)),
        health_check_interval=60,
        wake_fallback_s=settings.wake_fallback_s,
        drain_s=settings.drain_timeout_s,
    )


def serve_metrics(worker: WakeableWorker, port: int, host: str) -> None:
    if port:
        start_http_server(port, addr=host, registry=worker.runtime.metrics.registry)
