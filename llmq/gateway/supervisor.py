"""GATEWAY_PROCESSES > 1: one listening socket, several gateway processes, one /metrics.

The gateway is stateless, so on a host with more cores than one Python process can use,
several processes share the API port: this supervisor binds the socket once and starts
``GATEWAY_PROCESSES`` children (``python -m llmq.gateway``) that inherit it, and the kernel
hands each new connection to one of them. Their Prometheus metrics go to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode; a temporary folder
unless set) and the supervisor serves their sum on GATEWAY_METRICS_PORT (gauges combine as
each declares: requests in flight add up, queue depth is the latest reading).

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


def run(settings: Settings) -> int:
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="llmq-gateway-metrics-"
    )
    sock = listening_socket(settings.gateway_host, settings.gateway_port)
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        "GATEWAY_METRICS_PORT": "0",  # the supervisor serves them all
        "GATEWAY_PROCESSES": "1",
        FD_ENV: str(sock.fileno()),
    }
    children = [
        subprocess.Popen([sys.executable, "-m", "llmq.gateway"], env=env, pass_fds=(sock.fileno(),))
        for _ in range(settings.gateway_processes)
    ]
    sock.close()  # the children hold it
    if settings.gateway_metrics_port:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        start_http_server(
            settings.gateway_metrics_port, addr=settings.gateway_host, registry=registry
        )
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    logger.info(
        "gateway supervisor: %d processes on %s:%d",
        len(children),
        settings.gateway_host,
        settings.gateway_port,
    )
    code = 0
    try:
        while any(child.poll() is None for child in children):
            if not stopping and any(child.poll() is not None for child in children):
                logger.error("a gateway process exited on its own; stopping the others")
                code = 1
                forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(child.returncode not in (0, None) for child in children):
        code = 1
    return code


def inherited_socket() -> socket.socket | None:
    """In a child: the supervisor's listening socket, else None."""
    fd = os.environ.get(FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None
