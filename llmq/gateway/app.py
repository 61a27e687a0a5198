"""App factory and lifespan: pools live in one typed ``GatewayState``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import start_http_server
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llmq.gateway import (
    batch_api,
    completions,
    durable,
    embeddings,
    error_handlers,
    responses,
    stored,
)
from llmq.gateway.admission import Admission
from llmq.gateway.events import Subscriptions
from llmq.gateway.metrics import GatewayMetrics
from llmq.gateway.middleware import GatewayMiddleware
from llmq.gateway.registry import WorkerRegistry
from llmq.gateway.routes import router
from llmq.gateway.scaling import ScalingSignal
from llmq.gateway.state import GatewayState
from llmq.shared import tracing
from llmq.shared.queue.apikeys import KeyStore
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.connections import redis_client
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from llmq.shared.tasks import stop_if_cancelled, stop_task

logger = logging.getLogger(__name__)
_STOP_S = 2.0


def build_state(settings: Settings, redis: Redis | None = None) -> GatewayState:
    """Pools and helpers. ``redis`` (tests pass fakeredis) serves both commands and pub/sub;
    otherwise pub/sub gets a client of its own, without redis-py's health check (see
    ``gateway.events``), and every command is bounded by REDIS_TIMEOUT_S."""
    pubsub_redis = redis or redis_client(settings)
    redis = redis or redis_client(settings, timeout=settings.redis_timeout_s)
    metrics = GatewayMetrics()
    metrics.fallback_pairs(settings.model_fallbacks)
    sealer = settings.sealer(metrics.undecryptable.inc)
    store = Store(
        redis,
        settings.store_ttl_s,
        settings.redis_min_replicas_ack,
        settings.redis_wait_timeout_s,
        sealer=sealer,
        migrate_max=settings.migrations,
    )
    registry = WorkerRegistry(
        store,
        settings.registry_refresh_s,
        settings.model_aliases,
        settings.model_memory_s,
        reap_grace_s=settings.heartbeat_ttl_s,
        scale_to_zero=settings.scale_to_zero_models,
    )
    return GatewayState(
        settings=settings,
        redis=redis,
        store=store,
        registry=registry,
        subs=Subscriptions(pubsub_redis, sealer),
        admission=Admission(settings, store, registry),
        metrics=metrics,
        keys=KeyStore(redis),
        scaling=ScalingSignal(settings.scale_target_wait_s, settings.max_active),
        batches=BatchStore(
            redis,
            settings.file_ttl_s,
            settings.redis_min_replicas_ack,
            settings.redis_wait_timeout_s,
            sealer=sealer,
        ),
    )


async def refresh_gauges(st: GatewayState) -> None:
    """The gauges read from Redis (every replica reports the same truth) and the registry:
    each labelled model's load, capacity, drain rate and scaling signal (``gateway.scaling``)."""
    m, reg = st.metrics, st.registry
    models = reg.labelled_models()
    try:
        loads = await st.store.readings.load(models)
        counts, batch_demand = await st.batches.overview()
        for status, n in counts.items():
            m.batches.labels(status).set(n)
    except RedisError as exc:
        stop_if_cancelled()
        logger.debug("metrics: cannot read Redis: %s", exc)
        loads = None
    if loads is not None:
        m.export_models(st.scaling.rows(loads, reg, batch_demand))
    m.workers.set(len(reg.workers))
    m.redis_up.set(1 if reg.redis_ok else 0)
    await _replication_gauges(st)


async def _replication_gauges(st: GatewayState) -> None:
    """Replicas and their lag; a primary change (its replication id) counts as a failover."""
    try:
        rep = await st.store.readings.replication()
    except RedisError as exc:
        stop_if_cancelled()
        logger.debug("metrics: cannot read replication: %s", exc)
        return
    m = st.metrics
    m.redis_replicas.set(rep.replicas)
    m.redis_replica_lag.set(rep.max_lag_s)
    if st.replid and rep.replid and rep.replid != st.replid:
        m.redis_failovers.inc()
        logger.warning("the Redis primary changed (a failover): replication id %s", rep.replid)
    st.replid = rep.replid or st.replid


async def _gauges_loop(st: GatewayState) -> None:
    while True:
        await refresh_gauges(st)
        await asyncio.sleep(st.settings.registry_refresh_s)


def _serve_metrics(st: GatewayState) -> Callable[[], None]:
    """Prometheus metrics on GATEWAY_METRICS_PORT, off the public port; returns a stopper."""
    s = st.settings
    if not s.gateway_metrics_port:
        return lambda: None
    server, _thread = start_http_server(
        s.gateway_metrics_port, addr=s.gateway_host, registry=st.metrics.registry
    )
    return server.shutdown


def create_app(settings: Settings, state: GatewayState | None = None) -> FastAPI:
    """The gateway app. Everything it needs comes from ``settings`` (or a prepared state)."""
    st = state or build_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auth == "none":
            logger.warning("AUTH=none: every /v1 route is open to anyone who can reach it")
        await st.subs.start()
        await st.registry.refresh()
        refresher = asyncio.create_task(st.registry.run(), name="registry")
        gauges = asyncio.create_task(_gauges_loop(st), name="gauges")
        stop_metrics = _serve_metrics(st)
        logger.info(
            "gateway up: %d live worker(s), capacity %d, mode=%s queue_max=%d",
            len(st.registry.workers),
            st.registry.capacity(),
            settings.queue_mode,
            settings.queue_max,
        )
        try:
            yield
        finally:
            stop_metrics()
            await stop_task(gauges, _STOP_S, "the gauges refresher")
            await stop_task(refresher, _STOP_S, "the registry refresher")
            await st.subs.stop()
            await st.subs.redis.aclose()
            await st.redis.aclose()
            tracing.shutdown()  # what is still buffered goes out

    docs = settings.docs_enabled  # /docs and /openapi.json only when asked for
    app = FastAPI(
        title="llmq gateway",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.gateway = st
    if tracing.enabled():
        # A server span per request (a client's traceparent honoured), without a span per
        # ASGI send/receive: a stream sends once per few tokens.
        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="/health,/metrics", exclude_spans=["receive", "send"]
        )
    app.include_router(router)
    app.include_router(durable.router)
    app.include_router(stored.router)
    app.include_router(batch_api.router)
    app.include_router(responses.router)
    app.include_router(completions.router)
    app.include_router(embeddings.router)
    error_handlers.install(app)
    app.add_middleware(GatewayMiddleware, state=st)
    return app
