"""The Helm chart, checked without a cluster: helm lint, every example rendered and validated
against Kubernetes' schemas and the CRDs', and cross-checked with the code (settings, ports,
probes, labels, secrets, metrics, the monitoring files)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from llmq.gateway.metrics import GatewayMetrics
from llmq.gateway.scaling import ModelRow
from llmq.shared.queue.readings import ModelLoad
from llmq.shared.sealing import new_key, parse_keys
from llmq.shared.settings import Settings
from tests.support.helm import (
    CHART,
    EXAMPLES,
    NAMESPACE,
    RELEASE,
    Doc,
    container,
    env_values,
    helm,
    named,
    of_kind,
    pod_spec,
    render,
    render_error,
    validate_custom_resources,
    workloads,
)
from tests.support.stack import ROOT

pytestmark = pytest.mark.integration

# README "Kubernetes" names the version the chart is validated for; Chart.yaml's kubeVersion
# the oldest.
K8S_VERSIONS = ("1.29.0", "1.31.0")
TWO_MODELS = CHART / "examples/two-models-keda.yaml"
ONE_MODEL = CHART / "examples/one-model.yaml"
APP_CONTAINERS = ("gateway", "worker")  # the project's image
FULL = f"{RELEASE}-llmq"


@pytest.fixture(scope="module", params=EXAMPLES, ids=[p.stem for p in EXAMPLES])
def example(request: pytest.FixtureRequest) -> tuple[Path, list[Doc]]:
    return request.param, render(request.param)


def test_there_are_the_three_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"one-model", "two-models-keda", "external-redis",
                                          "embeddings"}  # fmt: skip


@pytest.mark.parametrize("values", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_helm_lint_is_clean(values: Path) -> None:
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_every_manifest_validates_against_the_schemas(example: tuple[Path, list[Doc]]) -> None:
    """Core kinds: Kubernetes' own schemas, strict (an unknown field is an error), for each
    version named; custom resources: their CRDs' schemas."""
    _, docs = example
    custom = [d for d in docs if d["apiVersion"].startswith(("keda.sh/", "monitoring.coreos"))]
    for doc in docs:
        if doc in custom:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message}")
    assert validate_custom_resources(custom) == []


def test_the_crd_validator_does_reject_a_bad_resource() -> None:
    """The check above can fail: a ScaledObject with a string for an integer is refused."""
    docs = render(TWO_MODELS)
    bad = json.loads(json.dumps(of_kind(docs, "ScaledObject")[0]))
    bad["spec"]["minReplicaCount"] = "zero"
    assert any("minReplicaCount" in line for line in validate_custom_resources([bad]))
    unknown = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}}
    problems = validate_custom_resources([unknown])
    assert problems == ["Thing/x: no validator for example.com/v1 Thing"]


STUBS = {"PAYLOAD_KEYS": new_key()}  # a secret's stand-in where its format is checked


def test_every_setting_the_chart_passes_is_a_settings_field_and_loads(
    example: tuple[Path, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each environment variable of a gateway or worker container names a Settings field,
    and the values (secrets stubbed) load as the process would load them."""
    _, docs = example
    fields = {name.upper() for name in Settings.model_fields}
    for doc in workloads(docs):
        for c in pod_spec(doc)["containers"]:
            if c["name"] not in APP_CONTAINERS:
                continue
            names = [e["name"] for e in c["env"]]
            assert len(names) == len(set(names)), f"{c['name']}: a variable set twice"
            assert set(names) <= fields, set(names) - fields
            for name in fields:
                monkeypatch.delenv(name, raising=False)
            for e in c["env"]:
                stub = STUBS.get(e["name"], "stub-secret-0123456789")
                monkeypatch.setenv(e["name"], e.get("value", stub))
            Settings()  # raises on a value the process would refuse


def test_ports_and_probes_match_what_the_processes_serve(example: tuple[Path, list[Doc]]) -> None:
    _, docs = example
    gw = container(named(docs, "Deployment", f"{FULL}-gateway"), "gateway")
    env = env_values(gw)
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"http": int(env["GATEWAY_PORT"]), "metrics": int(env["GATEWAY_METRICS_PORT"])}
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert gw["readinessProbe"]["httpGet"] == {"path": "/health?scope=gateway", "port": "http"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    models = [d for d in of_kind(docs, "Deployment") if "-model-" in d["metadata"]["name"]]
    assert models
    for doc in models:
        vllm, worker = container(doc, "vllm"), container(doc, "worker")
        wenv = env_values(worker)
        vllm_port = {p["name"]: p["containerPort"] for p in vllm["ports"]}["vllm"]
        assert wenv["VLLM_URL"] == f"http://127.0.0.1:{vllm_port}", "the engine in its pod"
        assert vllm["args"][vllm["args"].index("--port") + 1] == str(vllm_port)
        slots = wenv.get("MAX_ACTIVE_CEILING", wenv["MAX_ACTIVE"])
        assert vllm["args"][vllm["args"].index("--max-num-seqs") + 1] == slots
        metrics = {p["name"]: p["containerPort"] for p in worker["ports"]}["metrics"]
        assert int(wenv["WORKER_METRICS_PORT"]) == metrics
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert vllm[probe]["httpGet"] == {"path": "/health", "port": "vllm"}
        assert worker["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        assert f":{metrics}/metrics" in vllm["lifecycle"]["preStop"]["exec"]["command"][2]
        assert "nvidia.com/gpu" in vllm["resources"]["limits"]


def test_grace_periods_cover_the_drain(example: tuple[Path, list[Doc]]) -> None:
    _, docs = example
    gw = named(docs, "Deployment", f"{FULL}-gateway")
    c = container(gw, "gateway")
    drain = float(env_values(c)["DRAIN_TIMEOUT_S"])
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod_spec(gw)["terminationGracePeriodSeconds"] > sleep + drain
    for doc in of_kind(docs, "Deployment"):
        if "-model-" in doc["metadata"]["name"]:
            assert pod_spec(doc)["terminationGracePeriodSeconds"] > drain + 20


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pods(docs: list[Doc]) -> list[tuple[Doc, dict[str, str]]]:
    return [(d, d["spec"]["template"]["metadata"]["labels"]) for d in workloads(docs)]


def _port_names(doc: Doc) -> set[str]:
    return {p["name"] for c in pod_spec(doc)["containers"] for p in c.get("ports", [])}


def test_selectors_match_labels_and_named_ports_exist(example: tuple[Path, list[Doc]]) -> None:
    """Each workload's selector matches its pods; each Service selects pods that have its
    target ports; each StatefulSet has its headless Service."""
    _, docs = example
    pods = _pods(docs)
    for doc, labels in pods:
        assert _matches(doc["spec"]["selector"]["matchLabels"], labels)
    services = of_kind(docs, "Service")
    for svc in services:
        selected = [d for d, labels in pods if _matches(svc["spec"]["selector"], labels)]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            assert all(port["targetPort"] in _port_names(d) for d in selected), port
    for sts in of_kind(docs, "StatefulSet"):
        headless = named(docs, "Service", sts["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"


def test_monitors_and_policies_point_at_what_exists(example: tuple[Path, list[Doc]]) -> None:
    """Each ServiceMonitor selects one Service with its endpoint ports; PDBs, the HPA,
    ScaledObjects and NetworkPolicies point at workloads and ports that exist."""
    _, docs = example
    pods = _pods(docs)
    services = of_kind(docs, "Service")
    for sm in of_kind(docs, "ServiceMonitor"):
        match = [
            s for s in services
            if _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]  # fmt: skip
        assert len(match) == 1, sm["metadata"]["name"]
        svc_ports = {p["name"] for p in match[0]["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= svc_ports
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert any(_matches(pdb["spec"]["selector"]["matchLabels"], labels) for _, labels in pods)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names
    for so in of_kind(docs, "ScaledObject"):
        assert ("Deployment", so["spec"]["scaleTargetRef"]["name"]) in names
    for np in of_kind(docs, "NetworkPolicy"):
        sel = np["spec"]["podSelector"]
        selected = [
            d for d, labels in pods
            if _matches(sel.get("matchLabels", {}), labels)
            and all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []))
        ]  # fmt: skip
        assert selected, f"NetworkPolicy {np['metadata']['name']} selects no pod"
        for rule in np["spec"]["ingress"]:
            for port in rule["ports"]:
                assert any(port["port"] in _port_names(d) for d in selected), port


def test_only_the_project_pods_reach_redis() -> None:
    docs = render(ONE_MODEL)
    np = named(docs, "NetworkPolicy", f"{FULL}-redis")
    clients = np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    with_access = {d["metadata"]["name"] for d, labels in _pods(docs) if _matches(clients, labels)}
    models = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")} - {f"{FULL}-gateway"}
    assert models
    assert with_access == {f"{FULL}-gateway"} | models
    engines = named(docs, "NetworkPolicy", f"{FULL}-models")
    assert [set(r) for r in engines["spec"]["ingress"]] == [{"from", "ports"}], "Prometheus only"


def test_the_project_containers_run_as_non_root_read_only(example: tuple[Path, list[Doc]]) -> None:
    _, docs = example
    for doc in workloads(docs):
        spec = pod_spec(doc)
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            if c["name"] in APP_CONTAINERS:
                assert sc["runAsNonRoot"] is True
                assert sc["runAsUser"] == 10001
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            if c["name"] in ("redis", "sentinel"):
                assert spec["securityContext"]["runAsNonRoot"] is True


def test_payload_keys_are_generated_as_keys_and_a_malformed_one_is_refused() -> None:
    secret = named(render(ONE_MODEL), "Secret", f"{FULL}-secrets")
    generated = base64.b64decode(secret["data"]["payload-keys"]).decode()
    assert len(parse_keys(generated)) == 1
    given = f"{new_key()},{new_key()}"  # (--set-string splits at an unescaped comma)
    docs = render(ONE_MODEL, secrets__payloadKeys=given.replace(",", "\\,"))
    secret = named(docs, "Secret", f"{FULL}-secrets")
    assert base64.b64decode(secret["data"]["payload-keys"]).decode() == given
    bad = f"{new_key()}\\,not-a-key"
    error = render_error(ONE_MODEL, secrets__payloadKeys=bad)
    assert "secrets.payloadKeys: key 2 is not 32 bytes" in error
    assert "not-a-key" not in error


def test_secrets_come_from_the_secret_and_every_key_exists() -> None:
    docs = render(ONE_MODEL, secrets__vllmApiKey="visible-only-in-the-secret-0123")
    secret = named(docs, "Secret", f"{FULL}-secrets")
    for doc in workloads(docs):
        for c in pod_spec(doc)["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["data"]
                assert "visible-only" not in str(e.get("value", ""))
    assert len(set(secret["data"].values())) == len(secret["data"]), "each generated apart"


def test_redis_containers_set_only_what_their_scripts_read() -> None:
    docs = render(ONE_MODEL)
    scripts = "".join(
        (ROOT / "compose/redis" / f).read_text() for f in ("acl.sh", "sentinel.sh", "discover.sh")
    )
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", scripts)) | {"POD_NAME"}
    cm = named(docs, "ConfigMap", f"{FULL}-redis-scripts")
    assert set(cm["data"]) == {"redis-acl.sh", "sentinel.sh", "discover.sh"}
    for name in ("redis", "sentinel"):
        c = container(named(docs, "StatefulSet", f"{FULL}-{name}"), name)
        assert {e["name"] for e in c["env"]} <= read


def test_each_scaled_object_reads_an_exported_metric_with_the_scraped_labels() -> None:
    """The query's metric is one the gateway exports, with a `model` label; job and
    llmq_release are the ServiceMonitor's relabelings; the value is read as pods."""
    docs = render(TWO_MODELS)
    metrics = GatewayMetrics()
    metrics.export_models({"m": ModelRow(ModelLoad(1, {}, 0), 1, 1, 0.0, 1)})
    exported = generate_latest(metrics.registry).decode()
    sm = named(docs, "ServiceMonitor", f"{FULL}-gateway")
    (endpoint,) = sm["spec"]["endpoints"]
    relabel = {r["targetLabel"]: r["replacement"] for r in endpoint["relabelings"]}
    served = {
        container(d, "vllm")["args"][container(d, "vllm")["args"].index("--served-model-name") + 1]
        for d in of_kind(docs, "Deployment")
        if "-model-" in d["metadata"]["name"]
    }
    queried = set()
    for so in of_kind(docs, "ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["threshold"] == "1"
        query = trigger["metadata"]["query"]
        m = re.fullmatch(r"max\((\w+)\{(.*)\}\)", query)
        assert m, query
        assert f'{m.group(1)}{{model="m"}} 1.0' in exported
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        assert labels["job"] == relabel["job"]
        assert labels["llmq_release"] == relabel["llmq_release"]
        assert labels["namespace"] == NAMESPACE
        queried.add(labels["model"])
    assert queried == served


def test_monitoring_objects_carry_the_projects_files() -> None:
    docs = render(TWO_MODELS)
    rule = of_kind(docs, "PrometheusRule")[0]
    alerts = yaml.safe_load((ROOT / "monitoring/prometheus/rules/llmq-alerts.yml").read_text())
    assert rule["spec"] == alerts
    dash = named(docs, "ConfigMap", f"{FULL}-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "monitoring/grafana/dashboards/llmq-operator.json").read_text()
    assert json.loads(dash["data"]["llmq-operator.json"]) == json.loads(text)
    jobs = {
        r["replacement"]
        for sm in of_kind(docs, "ServiceMonitor")
        for e in sm["spec"]["endpoints"]
        for r in e["relabelings"]
        if r["targetLabel"] == "job"
    }
    used = set(re.findall(r'job=~?"([^"]+)"', json.dumps(alerts) + text))
    assert {j for u in used for j in u.split("|")} <= jobs, "the alerts' and panels' jobs"


def test_models_set_their_queue_places_and_scale_to_zero() -> None:
    docs = render(TWO_MODELS)
    env = env_values(container(named(docs, "Deployment", f"{FULL}-gateway"), "gateway"))
    assert json.loads(env["QUEUE_MAX_PER_MODEL"]) == {
        "qwen2.5-7b-instruct": 128,
        "qwen2.5-1.5b-instruct": 32,
    }
    assert env["SCALE_TO_ZERO_MODELS"] == "qwen2.5-1.5b-instruct"
    small = named(docs, "ScaledObject", f"{FULL}-model-qwen-1-5b")
    assert small["spec"]["minReplicaCount"] == 0
    assert small["spec"]["fallback"]["replicas"] == 1, "never zero on a lost signal"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"config__QUEUE_TIMEOUT_S": "30"}, "raise QUEUE_TIMEOUT_S to at least 170"),
        ({"config__QUEUE_MODE": "reject"}, "minReplicas 0 needs config.QUEUE_MODE=queue"),
        ({"config__REDIS_URL": "redis://x"}, "config.REDIS_URL is set by the chart"),
        ({"keda__prometheus__serverAddress": ""}, "keda.enabled needs keda.prometheus"),
        ({"models[0]__name": "Bad_Name"}, 'models[].name "Bad_Name"'),
        ({"modelAliases__gpt": "nobody"}, "modelAliases.gpt names"),
        ({"redis__replicas": "1"}, "needs redis.replicas >= 2"),
        ({"redis__mode": "cluster"}, 'redis.mode "cluster"'),
    ],
)
def test_values_that_cannot_work_are_refused(sets: dict[str, str], message: str) -> None:
    assert message in render_error(TWO_MODELS, **sets)


def test_an_embedding_model_runs_the_pooling_runner_beside_a_chat_model() -> None:
    docs = render(CHART / "examples/embeddings.yaml")
    chat = container(named(docs, "Deployment", f"{FULL}-model-qwen-7b"), "vllm")["args"]
    embed_doc = named(docs, "Deployment", f"{FULL}-model-minilm")
    embed = container(embed_doc, "vllm")["args"]
    assert embed[embed.index("--runner") + 1] == "pooling"
    assert "--runner" not in chat
    assert "--enable-auto-tool-choice" in chat
    assert "--enable-auto-tool-choice" not in embed, "no tool calling on a pooling model"
    assert "--max-model-len" not in embed, "the model's own context length"
    worker = env_values(container(embed_doc, "worker"))
    assert worker["MAX_ACTIVE"] == embed[embed.index("--max-num-seqs") + 1] == "64"
    gateway = env_values(container(named(docs, "Deployment", f"{FULL}-gateway"), "gateway"))
    assert json.loads(gateway["QUEUE_MAX_PER_MODEL"]) == {"all-MiniLM-L6-v2": 512}


def test_tracing_passes_the_otel_variables_and_points_vllm_at_the_same_backend() -> None:
    off = render(ONE_MODEL)
    gateway = env_values(container(named(off, "Deployment", f"{FULL}-gateway"), "gateway"))
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in gateway, "off by default"
    sampler = {"tracing__sampler": "parentbased_traceidratio", "tracing__samplerArg": "0.25"}
    on = render(ONE_MODEL, tracing__endpoint="http://phoenix.observability:6006", **sampler)
    gateway = env_values(container(named(on, "Deployment", f"{FULL}-gateway"), "gateway"))
    assert gateway["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://phoenix.observability:6006"
    assert gateway["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert gateway["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    assert gateway["TRACE_CONTENT"] == "false"
    model = next(d for d in of_kind(on, "Deployment") if "-model-" in d["metadata"]["name"])
    assert env_values(container(model, "worker"))["OTEL_EXPORTER_OTLP_ENDPOINT"]
    vllm = container(model, "vllm")
    assert "--otlp-traces-endpoint=http://phoenix.observability:6006/v1/traces" in vllm["args"]
    assert env_values(vllm)["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"


def test_an_empty_model_list_is_refused() -> None:
    assert "models is empty" in render_error(None)


def test_a_model_with_a_time_per_token_objective_sizes_its_slots(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``tpotObjectiveMs``: the worker runs MAX_ACTIVE=auto up to maxActive (vLLM's
    --max-num-seqs), keeping that time per token; the settings load as the worker's would."""
    values = yaml.safe_load(ONE_MODEL.read_text())
    values["models"][0]["tpotObjectiveMs"] = 50
    values.setdefault("config", {})["TTFT_OBJECTIVE_MS"] = '{"high": 500}'
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    docs = render(tmp_path / "values.yaml")
    model = next(d for d in of_kind(docs, "Deployment") if "-model-" in d["metadata"]["name"])
    vllm, worker = container(model, "vllm"), env_values(container(model, "worker"))
    assert worker["MAX_ACTIVE"] == "auto"
    assert worker["MAX_ACTIVE_CEILING"] == vllm["args"][vllm["args"].index("--max-num-seqs") + 1]
    assert worker["TPOT_OBJECTIVE_MS"] == "50"
    for name in ("MAX_ACTIVE", "MAX_ACTIVE_CEILING", "TPOT_OBJECTIVE_MS", "TTFT_OBJECTIVE_MS"):
        monkeypatch.setenv(name, worker.get(name, '{"high": 500}'))
    settings = Settings()
    assert settings.adaptive_slots
    assert settings.ttft_objective_ms == {"high": 500}
    gateway = env_values(container(named(docs, "Deployment", f"{FULL}-gateway"), "gateway"))
    assert gateway["TTFT_OBJECTIVE_MS"] == '{"high": 500}'
