"""App factory and lifespan: pools live in one typed ``GatewayState``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from llmq.gateway import errors
from llmq.gateway.admission import Admission
from llmq.gateway.events import Subscriptions
from llmq.gateway.metrics import GatewayMetrics
from llmq.gateway.middleware import GatewayMiddleware
from llmq.gateway.registry import WorkerRegistry
from llmq.gateway.routes import router
from llmq.gateway.state import GatewayState
from llmq.shared.settings import Settings
from llmq.shared.store import Store
from llmq.shared.tasks import stop_task

logger = logging.getLogger(__name__)
_STOP_S = 2.0


def build_state(settings: Settings, redis: Redis | None = None) -> GatewayState:
    """Pools and helpers. ``redis`` (tests pass fakeredis) serves both commands and pub/sub;
    otherwise pub/sub gets a client of its own, without redis-py's health check (see
    ``gateway.events``), and every command is bounded by REDIS_TIMEOUT_S."""
    pubsub_redis = redis or Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_keepalive=True,
    )
    redis = redis or Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_keepalive=True,
    )
    store = Store(redis)
    metrics = GatewayMetrics()
    registry = WorkerRegistry(store, settings.registry_refresh_s)
    return GatewayState(
        settings=settings,
        redis=redis,
        store=store,
        registry=registry,
        subs=Subscriptions(pubsub_redis),
        admission=Admission(settings, store, registry),
        metrics=metrics,
    )


def create_app(settings: Settings, state: GatewayState | None = None) -> FastAPI:
    """The gateway app. Everything it needs comes from ``settings`` (or a prepared state)."""
    st = state or build_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await st.subs.start()
        await st.registry.refresh()
        refresher = asyncio.create_task(st.registry.run(), name="registry")
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
            await stop_task(refresher, _STOP_S, "the registry refresher")
            await st.subs.stop()
            await st.subs.redis.aclose()
            await st.redis.aclose()

    app = FastAPI(title="llmq gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = st
    app.include_router(router)
    errors.install(app)
    app.add_middleware(GatewayMiddleware, state=st)
    return app
