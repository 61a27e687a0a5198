"""Connection-level bounds of the gateway's HTTP protocol (llmq/gateway/http.py), over raw
sockets against a real gateway process: head size while it arrives, head and body deadlines,
and that neither deadline touches a long response or a keep-alive connection."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests.support.clients import assert_drained, body, release, sim_stats, wait_held
from tests.support.stack import Stack

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture
def gw(stack: Stack):
    stack.worker()
    return stack.gateway(client_head_timeout_s=HEAD_TIMEOUT_S, client_body_timeout_s=BODY_TIMEOUT_S)


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (30 s socket timeout)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert b"x-request-id: req_" in head
    return status, err


def test_a_huge_header_is_refused_while_it_arrives(gw) -> None:
    """16 MiB announced, 128 KiB sent, never finished: 431 without waiting for the rest."""
    with _connect(gw.url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 128 * 1024:
                sock.sendall(b"a" * 8192)
                sent += 8192
        except OSError:
            pass  # the gateway may close while we still send
        status, err = _status_and_error(_read_until_closed(sock))
    assert status == 431
    assert err["code"] == "headers_too_large"


def test_an_idle_connection_is_closed_with_408(gw) -> None:
    with _connect(gw.url) as sock:
        started = time.monotonic()
        raw = _read_until_closed(sock)
        waited = time.monotonic() - started
    status, err = _status_and_error(raw)
    assert status == 408
    assert err["code"] == "client_timeout"
    assert HEAD_TIMEOUT_S * 0.9 <= waited < 20


def test_a_trickled_head_is_closed_although_bytes_keep_coming(gw) -> None:
    with _connect(gw.url) as sock:
        sock.settimeout(0.2)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        started = time.monotonic()
        raw = b""
        while time.monotonic() - started < 30:
            try:
                sock.sendall(b"X")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            raw += chunk
    status, err = _status_and_error(raw)
    assert status == 408
    assert "head" in err["message"]


def test_a_body_that_never_completes_is_408_and_enqueues_nothing(gw, rdb: redis.Redis, sim) -> None:
    payload = json.dumps(body(stream=False)).encode()
    with _connect(gw.url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(payload) + 100) + payload
        )
        status, err = _status_and_error(_read_until_closed(sock))
    assert status == 408
    assert "body" in err["message"]
    assert rdb.zcard("llmq:queue") == 0
    assert sim_stats(sim.url)["requests"] == 0


def test_a_stream_outlives_both_deadlines(gw, rdb: redis.Redis, sim) -> None:
    with (
        httpx.Client(base_url=gw.url, timeout=30) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=body(tokens=3, hold="long", hold_after=1)
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        wait_held(sim.url, "long", 1)
        time.sleep(max(HEAD_TIMEOUT_S, BODY_TIMEOUT_S) * 2)  # outlast both deadlines
        release(sim.url, "long")
        text = "\n".join(lines)
    assert text.rstrip().endswith("data: [DONE]")
    assert_drained(rdb)


def test_a_keep_alive_pause_longer_than_the_head_deadline_is_fine(gw) -> None:
    """Between requests, uvicorn's keep-alive timeout (5 s) applies, not the head deadline."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(gw.url) as sock:
        for _ in range(2):
            sock.sendall(request)
            raw = b""
            while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
                raw += sock.recv(65536)
            assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
            time.sleep(HEAD_TIMEOUT_S * 2)


def test_a_large_legal_head_sent_in_pieces_is_served(gw) -> None:
    """24 KiB of headers (under the 32 KiB limit) arriving in 4 KiB reads: each read is
    counted once, not once as raw bytes and again as parsed headers."""
    payload = json.dumps(body(stream=False, tokens=1)).encode()
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(24))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\n" + headers + b"Content-Length: %d\r\n\r\n" % len(payload)
    )
    with _connect(gw.url) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(head), 4096):
            sock.sendall(head[i : i + 4096])
            time.sleep(0.05)  # separate reads on the gateway's side
        sock.sendall(payload)
        raw = _read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]


def test_idle_connections_beyond_the_descriptors_do_not_lock_a_new_client_out(
    stack: Stack,
) -> None:
    """A gateway whose file-descriptor limit is 1024 (soft and hard, a common container
    default) and 1,124 idle connections open: a new client's chat and /health are answered
    within 2 s each, long before the head deadline (120 s here) would free anything; the
    oldest idle connections were closed to make room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:  # this test's own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    stack.worker()
    gw = stack.gateway(wrapper=("prlimit", "--nofile=1024:1024", "--"), client_head_timeout_s=120)
    idle: list[socket.socket] = []
    try:
        for _ in range(1124):
            idle.append(_connect(gw.url))
        for _ in range(3):
            started = time.monotonic()
            resp = httpx.post(gw.url + "/v1/chat/completions", json=body(stream=False), timeout=10)
            assert resp.status_code == 200, resp.text
            assert time.monotonic() - started < 2.0
            started = time.monotonic()
            assert httpx.get(gw.url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - started < 2.0
        closed = 0
        for sock in idle[:100]:  # the oldest: closed by the gateway with a 408
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                closed += sock.recv(65536).startswith(b"HTTP/1.1 408")
        assert closed >= 90
        log = gw.output()
        assert "file descriptors: limit 1024, so at most 896 connections" in log
    finally:
        for sock in idle:
            sock.close()
