"""The compose stack, checked without a Docker engine: schema, wiring, paths, commands."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml

from llmq.shared.settings import Settings
from local.launch import REDIS_PERSISTENT_FLAGS
from tests.support.stack import ROOT

COMPOSE = ROOT / "compose/docker-compose.yaml"
ENV_EXAMPLE = ROOT / "compose/.env.example"
SCHEMA = ROOT / "compose/schema/compose-spec.json"
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^}]*\})*))?\}")


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (enough for this file)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg or ""

    return _VAR.sub(sub, text)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    return node


def stack(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Parsed, then interpolated, as compose does (so interpolated values stay strings)."""
    parsed = yaml.safe_load(COMPOSE.read_text())
    loaded: dict[str, Any] = _walk(parsed, env_example() if env is None else env)
    return loaded


def validator() -> jsonschema.Draft201909Validator:
    # The vendored schema names its draft with a URL jsonschema does not map; say it here.
    return jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))


def test_valid_against_the_compose_specification() -> None:
    validator().validate(stack())


def test_the_schema_check_catches_mistakes() -> None:
    broken = stack()
    broken["services"]["gateway"]["restart_policy"] = "always"  # not a service key
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(broken)


def test_required_settings_stop_compose_with_a_message() -> None:
    env = env_example()
    del env["MODEL"]
    with pytest.raises(KeyError, match="MODEL is required"):
        stack(env)


def test_every_variable_is_documented_in_env_example() -> None:
    used = {m.group(1) for m in _VAR.finditer(COMPOSE.read_text())}
    assert used - set(env_example()) == set()


def test_the_expected_services_with_restart_policies() -> None:
    services = stack()["services"]
    assert set(services) >= {
        "vllm",
        "redis",
        "gateway",
        "worker",
        "prometheus",
        "grafana",
        "dcgm-exporter",
        "open-webui",
    }
    assert all(s.get("restart") for s in services.values())
    assert services["open-webui"]["profiles"] == ["webui"]
    assert services["grafana"]["ports"] == ["9091:3000"]
    assert services["gateway"]["ports"] == ["8080:8080"]
    assert "--appendfsync" in services["redis"]["command"]
    assert "noeviction" in services["redis"]["command"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["worker"]["depends_on"]["vllm"] == {"condition": "service_healthy"}
    cmd = services["vllm"]["command"]
    assert cmd[cmd.index("--max-num-seqs") + 1] == services["worker"]["environment"]["MAX_ACTIVE"]


def _ports(service: dict[str, Any]) -> set[str]:
    exposed = {str(p) for p in service.get("expose", [])}
    published = {str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])}
    return exposed | published


def test_every_scrape_target_is_a_service_with_that_port() -> None:
    services = stack()["services"]
    prom = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            if host == "localhost":
                continue
            assert host in services, f"{job['job_name']}: no service {host}"
            assert port in _ports(services[host]), f"{host} does not expose {port}"


def test_app_environment_names_real_settings_and_points_at_services() -> None:
    services = stack()["services"]
    fields = {name.upper() for name in Settings.model_fields}
    for name in ("gateway", "worker"):
        env = services[name]["environment"]
        assert set(env) <= fields, f"{name}: unknown settings {set(env) - fields}"
        Settings(**{k.lower(): v for k, v in env.items()})  # every value parses
        host = env["REDIS_URL"].split("//")[1].split(":")[0]
        assert host in services
    assert services["worker"]["environment"]["VLLM_URL"] == "http://vllm:8000"
    assert services["worker"]["environment"]["WORKER_METRICS_PORT"] in _ports(services["worker"])


def test_mounted_paths_exist_in_the_repo() -> None:
    for name, service in stack()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source}"


def test_image_commands_are_the_entry_points() -> None:
    services = stack()["services"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("gateway", "worker"):
        cmd = services[name]["command"]
        assert cmd == [f"llmq-{name}"]
        assert scripts[cmd[0]] == f"llmq.{name}.__main__:main"
        assert (ROOT / "llmq" / name / "__main__.py").exists()
        assert services[name]["build"]["context"] == ".."
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["llmq-gateway"]' in dockerfile
    assert "USER llmq" in dockerfile
    assert "HEALTHCHECK" in dockerfile
    assert "pip install --no-cache-dir ." in dockerfile
    assert "COPY llmq ./llmq" in dockerfile


def test_redis_runs_as_the_local_run_runs_it() -> None:
    command = stack()["services"]["redis"]["command"]
    flags = list(REDIS_PERSISTENT_FLAGS)
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    for flag, value in pairs.items():
        assert command[command.index(flag) + 1] == value, flag
