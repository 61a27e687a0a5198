"""A real Prometheus (Debian's package, installed by scripts/test.sh) on loopback, for the
tests that prove queries: the dashboard's and alerts' (e2e), the KEDA ScaledObjects'."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.stack import Proc, free_port, spawn, wait_for


def start_prometheus(logdir: Path, config: dict[str, Any], targets: int) -> Proc:
    """Prometheus with ``config``, ready, every one of its ``targets`` scraped and up."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus missing: scripts/test.sh installs Debian's prometheus package")
    path = logdir / f"prometheus-{free_port()}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    proc = spawn(
        "prometheus",
        [
            exe,
            f"--config.file={path}",
            f"--storage.tsdb.path={logdir / f'tsdb-{port}'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        logdir,
        port=port,
    )
    wait_for(lambda: httpx.get(proc.url + "/-/ready").status_code == 200, 30, "Prometheus")

    def all_up() -> bool:  # static targets arrive through discovery, in up to ~5 s
        active = httpx.get(proc.url + "/api/v1/targets").json()["data"]["activeTargets"]
        return len(active) == targets and all(t["health"] == "up" for t in active)

    # Scraped before any load, so counters are seen at 0 first and rates are non-zero after.
    wait_for(all_up, 30, "Prometheus to scrape every target")
    return proc


def query(prom: Proc, expr: str, what: str = "") -> list[Any]:
    """An instant query's result (a failed evaluation fails the test)."""
    resp = httpx.get(prom.url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", f"{what} {expr}: {body.get('error')}"
    result: list[Any] = body["data"]["result"]
    return result
