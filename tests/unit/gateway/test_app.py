"""The app in-process on fakeredis: what clients see when Redis or the workers are missing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import fakeredis
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from llmq.gateway.app import build_state, create_app
from llmq.shared.queue.store import Store
from llmq.shared.settings import Settings
from tests.support.records import worker_info

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> Iterator[TestClient]:
    settings = Settings(registry_refresh_s=0.05, auth="none", gateway_metrics_port=0)
    state = build_state(settings, fakeredis.FakeAsyncRedis(server=server))
    with TestClient(create_app(settings, state)) as c:
        yield c


def add_worker(client: TestClient, server: fakeredis.FakeServer) -> None:
    info = worker_info(max_active=1, started_at=time.time())

    async def beat() -> None:
        await Store(fakeredis.FakeAsyncRedis(server=server)).workers.heartbeat(info, ttl_s=30)
        await client.app.state.gateway.registry.refresh()  # type: ignore[attr-defined]

    client.portal.call(beat)  # type: ignore[union-attr]
    assert client.get("/health").status_code == 200, "the gateway counts the worker"


def test_no_worker_is_503_engine_unavailable(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json=BODY)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "engine_unavailable"
    assert resp.headers["retry-after"] == "5"
    assert client.get("/health").json()["reason"] == "no live worker with a ready engine"
    # The gateway's own readiness (Kubernetes' probe) leaves the engines out ...
    gateway_only = client.get("/health", params={"scope": "gateway"})
    assert gateway_only.status_code == 200
    assert gateway_only.json()["ready_workers"] == 0
    assert client.get("/health", params={"scope": "nope"}).status_code == 400


def test_redis_outage_is_503_queue_unavailable(
    client: TestClient, server: fakeredis.FakeServer
) -> None:
    add_worker(client, server)
    assert client.get("/health").status_code == 200
    server.connected = False
    resp = client.post("/v1/chat/completions", json=BODY)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "queue_unavailable"
    assert resp.headers["retry-after"] == "2"
    assert resp.headers["x-request-id"].startswith("req_"), "refused: no completion exists"
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["redis"] is False
    assert client.get("/health?scope=gateway").status_code == 503, "... but not Redis"
    metrics = generate_latest(client.app.state.gateway.metrics.registry).decode()  # type: ignore[attr-defined]
    assert 'api_rejections_total{model="m",reason="queue_unavailable"} 1.0' in metrics


def test_unknown_route_is_openai_shaped_404(client: TestClient) -> None:
    resp = client.get("/v1/nothing")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
