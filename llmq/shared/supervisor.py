"""Several gateway or worker processes under one supervisor, with one /metrics.

On a host with more cores than one Python process can use:
- ``GATEWAY_PROCESSES`` > 1: the gateway is stateless, so several processes share the API
  port. The supervisor binds the socket once and its children (``python -m llmq.gateway``)
  inherit it; the kernel hands each new connection to one of them.
- ``WORKER_PROCESSES`` > 1: several workers in front of one engine, MAX_ACTIVE split
  between them (the engine still sees at most MAX_ACTIVE requests), WORKER_ID suffixed
  ``-0``, ``-1``, ...: each is an ordinary worker with its own heartbeat.

The children's Prometheus metrics go to files in ``PROMETHEUS_MULTIPROC_DIR``
(prometheus-client's multiprocess mode; a temporary folder unless set) and the supervisor
serves them combined on the metrics port (counters and histograms add up, each gauge as
it declares: requests or jobs in flight add up, a queue depth is the latest reading).

SIGTERM/SIGINT are passed on to every child (each drains as a single gateway does, a
second signal ends it at once); the supervisor exits when they all have. A child that dies
on its own takes the others down and the supervisor exits 1, so that whatever restarts
the service (compose, systemd) restarts all of it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from llmq.shared.settings import Settings

logger = logging.getLogger(__name__)

FD_ENV = "LLMQ_GATEWAY_FD"  # set for a child: the inherited listening socket


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def supervise(
    module: str,
    envs: list[dict[str, str]],
    *,
    metrics_port: int,
    metrics_addr: str,
    pass_fds: tuple[int, ...] = (),
) -> int:
    """Run ``python -m module`` once per environment in ``envs`` until they all exit;
    serve their summed metrics on ``metrics_port`` (0: none). Returns the exit code."""
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="llmq-metrics-"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-m", module],
            env={**os.environ, **env, "PROMETHEUS_MULTIPROC_DIR": metrics_dir},
            pass_fds=pass_fds,
        )
        for env in envs
    ]
    if metrics_port:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        start_http_server(metrics_port, addr=metrics_addr, registry=registry)
    stopping = False
    # A child still starting has no handler yet and dies of a forwarded signal: that is a
    # stop, not a failure (a SIGTERM just after start-up must still exit 0).
    clean: set[int | None] = {0, None}

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        clean.add(-sig)
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    logger.info("%s: supervising %d processes", module, len(children))
    code = 0
    try:
        while any(child.poll() is None for child in children):
            if not stopping and any(child.poll() is not None for child in children):
                logger.error("a %s process exited on its own; stopping the others", module)
                code = 1
                forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(child.returncode not in clean for child in children):
        code = 1
    return code


def run_gateways(settings: Settings) -> int:
    """GATEWAY_PROCESSES gateways sharing one listening socket."""
    sock = listening_socket(settings.gateway_host, settings.gateway_port)
    env = {
        "GATEWAY_METRICS_PORT": "0",  # the supervisor serves them all
        "GATEWAY_PROCESSES": "1",
        FD_ENV: str(sock.fileno()),
    }
    try:
        return supervise(
            "llmq.gateway",
            [env] * settings.gateway_processes,
            metrics_port=settings.gateway_metrics_port,
            metrics_addr=settings.gateway_host,
            pass_fds=(sock.fileno(),),
        )
    finally:
        sock.close()


def run_workers(settings: Settings) -> int:
    """WORKER_PROCESSES workers in front of one engine, splitting MAX_ACTIVE between them
    (so the engine still sees at most MAX_ACTIVE requests), each with its own WORKER_ID.
    With MAX_ACTIVE=auto each sizes its own slots, and the ceiling is split."""
    n = settings.worker_processes
    if settings.max_active < n:
        raise SystemExit(f"MAX_ACTIVE ({settings.max_active}) < WORKER_PROCESSES ({n})")
    share = [settings.max_active // n + (1 if i < settings.max_active % n else 0) for i in range(n)]
    envs = [
        {
            **(
                {"MAX_ACTIVE": "auto", "MAX_ACTIVE_CEILING": str(share[i])}
                if settings.adaptive_slots
                else {"MAX_ACTIVE": str(share[i])}
            ),
            "WORKER_ID": f"{settings.worker_id}-{i}",
            "WORKER_PROCESSES": "1",
            "WORKER_METRICS_PORT": "0",
        }
        for i in range(n)
    ]
    return supervise(
        "llmq.worker",
        envs,
        metrics_port=settings.worker_metrics_port,
        metrics_addr=settings.worker_metrics_host,
    )


def inherited_socket() -> socket.socket | None:
    """In a child: the supervisor's listening socket, else None."""
    fd = os.environ.get(FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None
