"""The gateway's typed state: pools and helpers made in ``lifespan``, reached via ``Depends``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from llmq.gateway.admission import Admission
from llmq.gateway.events import Subscriptions
from llmq.gateway.metrics import GatewayMetrics
from llmq.gateway.registry import WorkerRegistry
from llmq.gateway.scaling import ScalingSignal
from llmq.shared.queue.apikeys import KeyStore
from llmq.shared.queue.batches import BatchStore
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings


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
    scaling: ScalingSignal  # each model's gauge row and scaling signal
    draining: bool = False
    active: int = 0  # requests in flight (counted by the ASGI middleware), drained on SIGTERM
    replid: str = ""  # the Redis primary's replication id last seen (a change: a failover)


async def get_state(request: Request) -> GatewayState:
    # async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a
    # thread hop (~0.3 ms here) on every request.
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
