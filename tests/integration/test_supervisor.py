"""GATEWAY_PROCESSES / WORKER_PROCESSES: several processes under one supervisor (real
processes): they share the port / split the slots, metrics add up, SIGTERM drains them
all, and one dying stops the supervisor with an error."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.support.clients import body
from tests.support.stack import Proc, Stack, free_port, wait_for

pytestmark = pytest.mark.integration


def _group(proc: Proc) -> list[int]:
    """Live pids of the supervisor's process group (it and its children)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.popen.pid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_two_processes_share_the_port_metrics_add_up_and_sigterm_drains(stack: Stack) -> None:
    stack.worker()
    gw = stack.gateway(gateway_processes=2)
    assert len(_group(gw)) == 3, "a supervisor and two gateway processes"
    with httpx.Client(timeout=30) as client:  # a new connection per request: both may serve
        for payload in [body(tokens=2), body(stream=False, tokens=2)] * 5:
            resp = client.post(
                gw.url + "/v1/chat/completions", json=payload, headers={"Connection": "close"}
            )
            assert resp.status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).text
    assert 'api_requests_total{method="POST",route="/v1/chat/completions",status="200"} 10.0' in (
        metrics
    )
    assert "api_active_requests 0.0" in metrics
    gw.popen.send_signal(signal.SIGTERM)
    assert gw.popen.wait(30) == 0
    assert gw.output().count("drained; exiting") == 2


def test_a_gateway_process_dying_stops_the_supervisor_with_an_error(stack: Stack) -> None:
    """Whatever restarts the service (compose, systemd) then restarts all of it."""
    stack.worker()
    gw = stack.gateway(gateway_processes=2)
    child = next(pid for pid in _group(gw) if pid != gw.popen.pid)
    os.kill(child, signal.SIGKILL)
    assert gw.popen.wait(30) == 1
    wait_for(lambda: _group(gw) == [], 10, "the other gateway process to exit")


def test_worker_processes_split_max_active_and_serve(stack: Stack, rdb) -> None:
    port = free_port()
    workers = stack.worker(
        worker_processes=2, max_active=3, worker_id="w", worker_metrics_port=port
    )
    gw = stack.gateway()
    assert len(_group(workers)) == 3, "a supervisor and two workers"
    wait_for(
        lambda: httpx.get(gw.url + "/health", timeout=5).json().get("capacity") == 3,
        15,
        "both workers' heartbeats (3 slots in all)",
    )
    slots = sorted(int(rdb.hget(f"llmq:worker:w-{i}", "max_active") or 0) for i in (0, 1))
    assert slots == [1, 2]
    with httpx.Client(timeout=30) as client:
        for payload in [body(tokens=2), body(stream=False, tokens=2)] * 3:
            assert client.post(gw.url + "/v1/chat/completions", json=payload).status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "worker_max_active 3.0" in metrics
    assert 'worker_jobs_total{outcome="completed"} 6.0' in metrics
    workers.popen.send_signal(signal.SIGTERM)
    assert workers.popen.wait(30) == 0
