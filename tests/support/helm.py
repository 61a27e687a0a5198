"""The Helm chart (deploy/helm/llmq), rendered by a real helm: what the chart tests share.

helm comes from ``scripts/test.sh`` (``LLMQ_HELM``; ``.cache/helm/helm`` by default), the
custom resources' validators from npm (``LLMQ_K8S_MODELS``: a node_modules folder).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.stack import ROOT

CHART = ROOT / "deploy/helm/llmq"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "prod", "llmq"
Doc = dict[str, Any]


def _tool(env: str, default: Path, what: str) -> str:
    path = Path(os.environ.get(env) or default)
    if not path.exists():
        pytest.fail(f"{what} missing at {path}: scripts/test.sh installs it")
    return str(path)


def helm_binary() -> str:
    return _tool("LLMQ_HELM", ROOT / ".cache/helm/helm", "helm")


def k8s_models() -> str:
    return _tool("LLMQ_K8S_MODELS", ROOT / ".cache/k8s-models/node_modules", "the CRD validators")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def template_args(values: Path | None, sets: dict[str, str]) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        args += ["-f", str(values)]
    for key, value in sets.items():
        args += ["--set-string", f"{key}={value}"]
    return args


def render(values: Path | None = None, **sets: str) -> list[Doc]:
    """``helm template`` of the chart: the manifests as dicts (``--set-string key=value`` from
    ``sets``, dotted keys written with __ for the dots)."""
    out = helm(*template_args(values, {k.replace("__", "."): v for k, v in sets.items()}))
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_error(values: Path | None = None, **sets: str) -> str:
    """The error of a ``helm template`` that must fail."""
    out = helm(*template_args(values, {k.replace("__", "."): v for k, v in sets.items()}))
    assert out.returncode != 0, "rendered, but these values must be refused"
    return out.stderr


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def container(doc: Doc, name: str) -> Doc:
    found = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name} in {doc['metadata']['name']}"
    return found[0]


def env_values(c: Doc) -> dict[str, str]:
    """A container's literal environment (valueFrom entries left out)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def validate_custom_resources(docs: list[Doc]) -> list[str]:
    """KEDA's and Prometheus Operator's objects checked against their CRDs' schemas (the
    @kubernetes-models validators, run by node): one line per problem."""
    script = ROOT / "tests/support/validate_crs.mjs"
    out = subprocess.run(
        ["node", str(script), k8s_models()],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]
