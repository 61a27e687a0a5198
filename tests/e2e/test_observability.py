"""Every dashboard and alert query, evaluated by a real Prometheus scraping the real processes
(gateway, worker, vLLM) after a load that includes rejections."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from local.prometheus_config import SOURCE, localize
from tests.support.clients import admitted
from tests.support.prometheus import query, start_prometheus
from tests.support.stack import BUNDLED_MODEL as MODEL
from tests.support.stack import ROOT, Proc, Stack, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
DASHBOARD = ROOT / "monitoring/grafana/dashboards/llmq-operator.json"
# No DCGM exporter runs without a GPU: those panels may be empty here (and only those).
NO_TARGET_HERE = ("DCGM_",)


def start_compose_prometheus(logdir: Path, targets: dict[str, str]) -> Proc:
    """Prometheus with the compose config, its jobs pointed at ``targets`` (job: address)."""
    text = localize(SOURCE.read_text(), targets, "1s", SOURCE.parent / "rules")
    return start_prometheus(logdir, yaml.safe_load(text), len(targets))


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$instance", ".*").replace("$model", ".*")
            expr = expr.replace("$__rate_interval", "1m")
            out.append((panel["title"], expr))
    return out


def alert_queries() -> list[tuple[str, str]]:
    out = []
    for rules in (SOURCE.parent / "rules").glob("*.yml"):
        text = rules.read_text()
        for m in re.finditer(r"- alert: (\S+)\n\s+expr: (>-\n((?:\s{10}.*\n)+)|(.*)\n)", text):
            expr = m.group(3) or m.group(4)
            out.append((m.group(1), " ".join(expr.split())))
    return out


async def drive_load(url: str, rdb: redis.Redis) -> list[int]:
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    async with httpx.AsyncClient(timeout=120) as c:
        # One slot, reject mode: the first takes it for ~2 s (48 tokens with ignore_eos), so
        # the two others, sent at once, find it busy even on a loaded machine.
        long = {**body, "max_tokens": 48, "ignore_eos": True}
        burst = await asyncio.gather(
            *(c.post(url + "/v1/chat/completions", json=long) for _ in range(3))
        )
        more = []
        for headers, payload in (
            ({}, {**body, "stream": False}),
            # Service levels: one objective met, one that cannot be (the engine's measured
            # time to first token alone exceeds 1 ms).
            ({"X-TTFT-Objective-Ms": "60000"}, {**body, "stream": False}),
            ({"X-TTFT-Objective-Ms": "1"}, body),
        ):
            # The worker frees the slot just after the last event went out: wait for it
            # (reject mode: a busy slot would be a 429 server_busy).
            await asyncio.to_thread(wait_for, lambda: admitted(rdb) == 0, 30, "a free slot")
            more.append(await c.post(url + "/v1/chat/completions", json=payload, headers=headers))
        more += [
            await c.post(url + "/v1/chat/completions", json={**body, "model": "nope"}),
            await c.post(url + "/v1/chat/completions", json={"model": MODEL}),
        ]
    return [r.status_code for r in [*burst, *more]]


def test_every_dashboard_and_alert_query_works_on_real_data(
    stack: Stack, vllm: Proc, rdb: redis.Redis, logdir: Path
) -> None:
    worker_port = free_port()
    stack.worker(max_active=1, worker_metrics_port=worker_port)
    # A fallback pair, so that the fallbacks panel has its series from the start; from the
    # second served name, which the load does not ask for (the burst must still be refused).
    fallbacks = json.dumps({"smol-second": [MODEL]})
    gw = stack.gateway(queue_mode="reject", model_fallbacks=fallbacks)
    prom = start_compose_prometheus(
        logdir,
        {
            "gateway": f"127.0.0.1:{gw.metrics_port}",
            "worker": f"127.0.0.1:{worker_port}",
            "vllm": vllm.url[7:],
        },
    )
    stack.procs.append(prom)
    statuses = asyncio.run(drive_load(gw.url, rdb))
    assert sorted(statuses) == [200, 200, 200, 400, 404, 429, 429, 429], statuses
    wait_for(
        lambda: (
            bool(query(prom, 'api_rejections_total{reason="server_busy"} > 0'))
            and bool(query(prom, 'worker_jobs_total{outcome="completed"} > 0'))
        ),
        30,
        "Prometheus to scrape the load",
    )
    # Series born during the load (one per status) need two samples before rate() has any.
    two_samples = 'min(count_over_time(api_requests_total{route="/v1/chat/completions"}[1m])) >= 2'
    objectives = "min(count_over_time(api_deadline_refusals_total[1m])) >= 2"
    wait_for(
        lambda: (
            bool(query(prom, "rate(api_completion_tokens_total[1m]) > 0"))
            and bool(query(prom, two_samples))
            and bool(query(prom, objectives))
        ),
        30,
        "two scrapes after the load",
    )

    exempt = []
    for title, expr in dashboard_queries():
        result = query(prom, expr)
        if any(m in expr for m in NO_TARGET_HERE):
            exempt.append(title)
            continue
        assert result, f"panel {title!r} returns no data: {expr}"
    for name, expr in alert_queries():
        query(prom, expr, f"alert {name}")  # must evaluate; firing or not depends on the moment
    assert len(alert_queries()) == sum(
        r.read_text().count("- alert:") for r in (SOURCE.parent / "rules").glob("*.yml")
    )
    print(f"exempt (no DCGM exporter without a GPU): {sorted(set(exempt))}")
    rules = httpx.get(prom.url + "/api/v1/rules").json()["data"]["groups"]
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
