"""Errors in OpenAI shape from the real gateway: edge validation and engine refusals."""

from __future__ import annotations

import httpx
import pytest
import redis

from tests.support.clients import admitted, assert_drained, body, sim_stats
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def gw(stack: Stack):
    stack.worker()
    return stack.gateway(max_body_bytes=4096)


def _post(gw, **kw) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=10, **kw)


def _error(resp: httpx.Response, *, admitted: bool = False) -> dict:
    """The OpenAI error body; x-request-id is the job's id once one was admitted (the
    engine refused it), else the request's own."""
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert resp.headers["x-request-id"].startswith("chatcmpl-" if admitted else "req_")
    return err


def test_malformed_json_is_400(gw, rdb: redis.Redis) -> None:
    resp = _post(gw, content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert _error(resp)["code"] == "invalid_request"
    assert rdb.zcard("llmq:queue") == 0


def test_schema_violation_names_the_field(gw, rdb: redis.Redis) -> None:
    resp = _post(gw, json={"model": "sim-model", "messages": [{"role": "wizard"}]})
    err = _error(resp)
    assert resp.status_code == 400
    assert err["param"] == "messages.0.role"
    resp = _post(gw, json={"model": "sim-model", "messages": []})
    assert resp.status_code == 400
    assert _error(resp)["param"] == "messages"
    assert_drained(rdb)


def test_body_over_limit_is_413(gw, rdb: redis.Redis) -> None:
    big = body(stream=False)
    big["messages"][0]["content"] = "x" * 10_000
    resp = _post(gw, json=big)
    assert resp.status_code == 413
    assert _error(resp)["code"] == "request_too_large"

    def chunked():
        yield b'{"model": "sim-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    resp = _post(gw, content=chunked(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert _error(resp)["code"] == "request_too_large"
    assert rdb.zcard("llmq:queue") == 0


def test_unknown_model_is_404(gw) -> None:
    resp = _post(gw, json={**body(), "model": "gpt-9"})
    assert resp.status_code == 404
    err = _error(resp)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"


@pytest.mark.parametrize("status", [400, 500])
def test_engine_refusal_keeps_its_status_and_message(gw, rdb: redis.Redis, status: int) -> None:
    for stream in (True, False):
        resp = _post(gw, json=body(stream=stream, fail_status=status))
        assert resp.status_code == status
        assert _error(resp, admitted=True)["message"] == "injected failure"
    assert_drained(rdb)


def test_unknown_fields_reach_the_engine(gw) -> None:
    # ``sim`` is unknown to the gateway: if it were dropped the engine would send 16 tokens.
    resp = _post(gw, json=body(stream=False, tokens=2))
    assert resp.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"x":'
         + b"[" * 300 + b"]" * 300 + b"}", "nested deeper"),
        (b'{"model":"sim-model","messages":[{"role":"user","content":"\\ud800"}]}',
         "not valid Unicode"),
        (b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"x":'
         + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON objects/arrays"),
    ],
)  # fmt: skip
def test_hostile_bodies_are_400_and_enqueue_nothing(
    stack: Stack, rdb: redis.Redis, sim, raw: bytes, what: str
) -> None:
    stack.worker()
    gw = stack.gateway()
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert what in _error(resp)["message"]
    assert rdb.zcard("llmq:queue") == 0
    assert admitted(rdb) == 0
    assert sim_stats(sim.url)["requests"] == 0
    assert " ERROR " not in gw.output(), "a client's bad body is not a server error"


@pytest.mark.parametrize(
    "headers",
    [{"x-big": "a" * 65536}, {f"x-h{i}": "1" for i in range(200)}],
    ids=["64KiB-header", "200-headers"],
)
def test_oversized_headers_are_431(gw, headers: dict[str, str]) -> None:
    resp = _post(gw, json=body(stream=False), headers=headers)
    assert resp.status_code == 431
    assert _error(resp)["code"] == "headers_too_large"
