"""The gateway's typed state: pools and helpers made in ``lifespan``, reached via ``Depends``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from llmq.gateway.admission import Admission
from llmq.gateway.events import Subscriptions
from llmq.gateway.metrics import GatewayMetrics
from llmq.gateway.registry import WorkerRegistry
from llmq.gateway.scaling import DrainRates
from llmq.shared.batches import BatchStore
from llmq.shared.keystore import KeyStore
from llmq.shared.settings import Settings
from llmq.shared.store import Store


@dataclass
class GatewayState:
    settings: Settings
    redis: Redis
    store: Store
    registry: WorkerRegistry
    subs: Subscriptions
    admission: Admission
    metrics: GatewayMetrics
    keys: KeyStore
    batches: BatchStore
    draining: bool = False
    active: int = 0  # requests in flight (counted by the ASGI middleware), drained on SIGTERM
    drains: DrainRates = field(default_factory=DrainRates)  # per model, for the gauges
    replid: str = ""  # the Redis primary's replication id last seen (a change: a failover)


async def get_state(request: Request) -> GatewayState:
    # async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a
    # thread hop (~0.3 ms here) on every request.
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
