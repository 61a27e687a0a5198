"""The two-model example's KEDA queries, answered by a real Prometheus that scrapes a loopback
stack the way Prometheus Operator scrapes the chart's ServiceMonitors: a gateway started with
the chart's own settings, the first model's worker and engine (a simulator), and none for the
second model, which the example scales to zero. Each ScaledObject's query returns data; a
request for the scaled-to-zero model waits in its queue and its query asks for a worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.clients import body, release, wait_held
from tests.support.helm import (
    CHART,
    NAMESPACE,
    Doc,
    container,
    env_values,
    named,
    of_kind,
    render,
)
from tests.support.prometheus import query, start_prometheus
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TWO_MODELS = CHART / "examples/two-models-keda.yaml"
# What the test provides instead of the cluster: Redis and the ports are the stack's.
LOCAL = ("REDIS_", "GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_METRICS_PORT")


def served_name(deployment: Doc) -> str:
    args: list[str] = container(deployment, "vllm")["args"]
    return args[args.index("--served-model-name") + 1]


def scrape_configs(docs: list[Doc], targets: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """What Prometheus Operator makes of the chart's ServiceMonitors, for the endpoints that
    have a loopback target here ((Service, port name) -> host:port): the endpoint's path, the
    `namespace` and `service` labels the operator adds, and the endpoint's relabelings
    (static replacements: the chart sets `job` and `llmq_release` so)."""
    services = of_kind(docs, "Service")
    jobs = []
    for sm in of_kind(docs, "ServiceMonitor"):
        selector = sm["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        for i, ep in enumerate(sm["spec"]["endpoints"]):
            address = targets.get((svc["metadata"]["name"], ep["port"]))
            if address is None:
                continue
            relabel = [
                {"target_label": r["targetLabel"], "replacement": r["replacement"]}
                for r in ep["relabelings"]
                if r["action"] == "replace" and "sourceLabels" not in r
            ]
            assert len(relabel) == len(ep["relabelings"]), "only static relabelings here"
            labels = {"namespace": NAMESPACE, "service": svc["metadata"]["name"]}
            jobs.append(
                {
                    "job_name": f"serviceMonitor/{NAMESPACE}/{sm['metadata']['name']}/{i}",
                    "metrics_path": ep["path"],
                    "static_configs": [{"targets": [address], "labels": labels}],
                    "relabel_configs": relabel,
                }
            )
    return jobs


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return render(TWO_MODELS)


@pytest.fixture
def engine(logdir: Path, docs: list[Doc]) -> Iterator[Proc]:
    models = [d for d in of_kind(docs, "Deployment") if "-model-" in d["metadata"]["name"]]
    sim = start_sim(logdir, "--model", served_name(models[0]), "--ttft-ms", "5", "--tokens", "4")
    yield sim
    sim.kill()


def test_each_scaled_object_query_returns_the_signal(
    stack: Stack, engine: Proc, docs: list[Doc], logdir: Path
) -> None:
    full = docs[0]["metadata"]["labels"]["app.kubernetes.io/instance"] + "-llmq"
    gateway = container(named(docs, "Deployment", f"{full}-gateway"), "gateway")
    chart_env: dict[str, object] = {
        k: v for k, v in env_values(gateway).items() if not k.startswith(LOCAL)
    }
    models = [d for d in of_kind(docs, "Deployment") if "-model-" in d["metadata"]["name"]]
    warm, cold = served_name(models[0]), served_name(models[1])
    assert cold in str(chart_env["SCALE_TO_ZERO_MODELS"]).split(",")
    worker_env = env_values(container(models[0], "worker"))
    stack.worker(vllm_url=engine.url, max_active=worker_env["MAX_ACTIVE"])
    gw = stack.gateway(True, (), **{k.lower(): v for k, v in chart_env.items()})
    # The readiness probe the chart gives gateways answers 200 on the running gateway.
    probe = gateway["readinessProbe"]["httpGet"]["path"]
    wait_for(lambda: httpx.get(gw.url + probe).status_code == 200, 30, "the readiness probe")
    wait_for(
        lambda: warm in {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]},
        30,
        "the warm model's worker",
    )
    prom = start_prometheus(
        logdir,
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs(
                docs, {(f"{full}-gateway", "metrics"): f"127.0.0.1:{gw.metrics_port}"}
            ),
        },
        targets=1,
    )
    try:
        warm_signal, cold_signal = scale_signals(prom, docs, models, engine, gw, warm, cold)
    finally:
        prom.kill()
    assert warm_signal == 1.0, "one running job: one worker"
    assert cold_signal == 1.0, "one waiting job and no worker: KEDA scales it from zero"


def scale_signals(
    prom: Proc, docs: list[Doc], models: list[Doc], engine: Proc, gw: Proc, warm: str, cold: str
) -> tuple[float | None, float | None]:
    """Each ScaledObject's query idle, then under load: one job running on the warm model,
    one waiting for the cold one (no worker). Returns the two values seen under load."""
    queries = {
        so["spec"]["scaleTargetRef"]["name"]: so["spec"]["triggers"][0]["metadata"]["query"]
        for so in of_kind(docs, "ScaledObject")
    }
    by_model = {served_name(d): queries[d["metadata"]["name"]] for d in models}

    def signal(model: str) -> float | None:
        result = query(prom, by_model[model], f"ScaledObject of {model}")
        return float(result[0]["value"][1]) if result else None

    # Idle: both queries return data (0 desired for the cold model: KEDA may scale it to zero).
    wait_for(lambda: signal(warm) is not None and signal(cold) == 0.0, 30, "the idle signal")

    async def load() -> tuple[float | None, float | None]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            url = "/v1/chat/completions"
            running = asyncio.create_task(
                client.post(url, json=body(stream=False, model=warm, hold="warm"))
            )
            waiting = asyncio.create_task(client.post(url, json=body(stream=False, model=cold)))
            await asyncio.to_thread(wait_held, engine.url, "warm", 1)

            def both_ask() -> bool:
                return (signal(warm) or 0) >= 1 and (signal(cold) or 0) >= 1

            await asyncio.to_thread(wait_for, both_ask, 30, "a worker asked for each model")
            seen = signal(warm), signal(cold)
            assert not waiting.done(), "the scaled-to-zero model's request waits in its queue"
            release(engine.url, "warm")
            assert (await running).status_code == 200
            waiting.cancel()  # the client leaves: the gateway withdraws its job
            return seen

    return asyncio.run(load())
