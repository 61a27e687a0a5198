from __future__ import annotations

import pytest

from llmq.shared.errors import (
    EngineUnavailable,
    InvalidRequest,
    QueueFull,
    QueueTimeout,
    RequestTimeout,
    ServerBusy,
    ServiceError,
    UpstreamError,
)


@pytest.mark.parametrize(
    ("err", "status", "code", "retry"),
    [
        (InvalidRequest("x", param="messages"), 400, "invalid_request", None),
        (QueueFull("x"), 429, "queue_full", "1"),
        (ServerBusy("x", retry_after_s=3), 429, "server_busy", "3"),
        (EngineUnavailable("x"), 503, "engine_unavailable", "5"),
        (QueueTimeout("x"), 503, "queue_timeout", "1"),
        (RequestTimeout("x"), 504, "request_timeout", None),
    ],
)
def test_mapping(err: ServiceError, status: int, code: str, retry: str | None) -> None:
    assert err.status == status
    assert err.body()["error"]["code"] == code
    assert err.headers().get("Retry-After") == retry


def test_wire_round_trip_keeps_class_and_upstream_status() -> None:
    back = ServiceError.from_wire(QueueTimeout("late").to_wire())
    assert isinstance(back, QueueTimeout)
    assert back.message == "late"
    up = ServiceError.from_wire(
        UpstreamError(400, "too long", error_type="BadRequestError", code=400).to_wire()
    )
    assert isinstance(up, UpstreamError)
    assert up.status == 400
    assert up.body() == {
        "error": {"message": "too long", "type": "BadRequestError", "param": None, "code": "400"}
    }


def test_upstream_status_outside_errors_becomes_502() -> None:
    assert UpstreamError(200, "odd").status == 502


@pytest.mark.parametrize("status", [429, 503])
def test_engine_overload_passes_through_with_retry_after(status: int) -> None:
    assert UpstreamError(status, "busy").headers() == {"Retry-After": "1"}
    assert UpstreamError(400, "bad").headers() == {}
