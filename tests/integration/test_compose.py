"""The compose stack, checked without a Docker engine: schema, wiring, paths, commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from llmq.shared.sealing import new_key, parse_keys
from llmq.shared.settings import Settings
from local.launch import REDIS_PERSISTENT_FLAGS
from tests.support.stack import ROOT

COMPOSE = ROOT / "compose/docker-compose.yaml"
ENV_EXAMPLE = ROOT / "compose/.env.example"
SCHEMA = ROOT / "compose/schema/compose-spec.json"
SECRETS = (
    "REDIS_ADMIN_PASSWORD",
    "REDIS_GATEWAY_PASSWORD",
    "REDIS_WORKER_PASSWORD",
    "VLLM_API_KEY",
    "GRAFANA_ADMIN_PASSWORD",
)
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^}]*\})*))?\}")


def env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def env_example() -> dict[str, str]:
    """.env.example with its (empty) secrets filled, as secrets.sh fills them."""
    filled = {name: f"test-{name.lower().replace('_', '-')}" for name in SECRETS}
    return {**env_file(), **filled, "PAYLOAD_KEYS": new_key()}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} (the default itself interpolated: nested),
    ${VAR:?error} (enough for this file)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return interpolate(arg, env) if arg else ""

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
    assert services["grafana"]["ports"] == ["127.0.0.1:9091:3000"]
    assert services["gateway"]["ports"] == ["0.0.0.0:8080:8080"]
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
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        for dns in job.get("dns_sd_configs", []):
            targets += [f"{name}:{dns['port']}" for name in dns["names"]]
        assert targets, job
        for target in targets:
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
        # OTEL_*: OpenTelemetry's standard variables, read by its SDK (shared/tracing.py).
        ours = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
        assert set(ours) <= fields, f"{name}: unknown settings {set(ours) - fields}"
        Settings(**{k.lower(): v for k, v in ours.items()})  # every value parses
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


def test_no_secret_has_a_default_and_each_one_is_required() -> None:
    example = env_file()
    text = COMPOSE.read_text()
    for name in SECRETS:
        assert example[name] == "", f"{name} has a value in .env.example"
        assert f"${{{name}:?" in text
        assert f"${{{name}:-" not in text, f"{name} has a default in compose"
        env = env_example()
        env[name] = ""
        with pytest.raises(KeyError, match=f"{name} is required"):
            stack(env)


def test_payload_keys_are_required_and_shared_by_gateways_and_workers() -> None:
    assert env_file()["PAYLOAD_KEYS"] == "", "no key in .env.example"
    env = env_example()
    services = stack(env)["services"]
    for role in ("gateway", "worker", "worker-2"):
        assert services[role]["environment"]["PAYLOAD_KEYS"] == env["PAYLOAD_KEYS"], role
    with pytest.raises(KeyError, match="PAYLOAD_KEYS is required"):
        stack({**env, "PAYLOAD_KEYS": ""})


def test_only_the_gateway_is_published_beyond_this_host() -> None:
    services = stack()["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"gateway", "grafana", "open-webui", "phoenix"}
    assert published["gateway"] == ["0.0.0.0:8080:8080"]
    assert published["grafana"][0].startswith("127.0.0.1:")
    assert published["open-webui"][0].startswith("127.0.0.1:")
    assert published["phoenix"][0].startswith("127.0.0.1:")


def test_redis_requires_a_password_and_each_service_has_its_own_user() -> None:
    services = stack()["services"]
    redis = services["redis"]
    assert redis["entrypoint"] == ["/bin/sh", "/etc/llmq/redis-acl.sh"]
    assert "./redis/acl.sh:/etc/llmq/redis-acl.sh:ro" in redis["volumes"]
    assert redis["command"][:2] == ["docker-entrypoint.sh", "redis-server"]
    assert redis["command"][redis["command"].index("--maxmemory") + 1] == "1gb"
    assert "REDIS_ADMIN_PASSWORD" in redis["healthcheck"]["test"][1]
    for role in ("gateway", "worker"):
        env = services[role]["environment"]
        assert "@" not in env["REDIS_URL"], "no credentials in the URL"
        assert env["REDIS_USERNAME"] == role
        assert env["REDIS_PASSWORD"] == redis["environment"][f"REDIS_{role.upper()}_PASSWORD"]
    # tests/integration/test_redis_acl.py runs acl.sh with a real redis-server.


def test_vllm_requires_the_api_key_the_worker_sends() -> None:
    services = stack()["services"]
    key = services["vllm"]["environment"]["VLLM_API_KEY"]
    assert key == env_example()["VLLM_API_KEY"]
    assert services["worker"]["environment"]["VLLM_API_KEY"] == key


def test_secrets_sh_fills_every_secret_once_and_prints_none(tmp_path: Path) -> None:
    for name in ("secrets.sh", ".env.example"):
        shutil.copy(COMPOSE.parent / name, tmp_path / name)
    first = subprocess.run(["sh", str(tmp_path / "secrets.sh")], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    env = env_file(tmp_path / ".env")
    for name in SECRETS:
        assert re.fullmatch(r"[0-9a-f]{48}", env[name]), name
        assert env[name] not in first.stdout + first.stderr
    assert oct((tmp_path / ".env").stat().st_mode)[-3:] == "600"
    assert len(parse_keys(env["PAYLOAD_KEYS"])) == 1, "a key PAYLOAD_KEYS takes"
    assert env["PAYLOAD_KEYS"] not in first.stdout + first.stderr
    stack(env)  # compose would start
    again = subprocess.run(["sh", str(tmp_path / "secrets.sh")], capture_output=True, text=True)
    assert again.returncode == 0
    assert again.stdout == ""
    assert env_file(tmp_path / ".env") == env


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "is not set"),
        ("short", "must be at least 16"),
        ("has spaces in it, see", "may hold only"),
    ],
)
def test_redis_acl_script_refuses_missing_and_weak_passwords(
    tmp_path: Path, value: str | None, message: str
) -> None:
    env = {**os.environ, **{f"REDIS_{r}_PASSWORD": "x" * 20 for r in ("ADMIN", "WORKER")}}
    env["LLMQ_REDIS_ACL_FILE"] = str(tmp_path / "users.acl")
    if value is not None:
        env["REDIS_GATEWAY_PASSWORD"] = value
    else:
        env.pop("REDIS_GATEWAY_PASSWORD", None)
    res = subprocess.run(
        ["sh", str(COMPOSE.parent / "redis/acl.sh"), "true"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert f"REDIS_GATEWAY_PASSWORD {message}" in res.stderr
    assert not (tmp_path / "users.acl").exists()


def test_vllm_runs_with_tool_calling_and_open_webui_with_the_tested_settings() -> None:
    """Open WebUI sends tools with tool_choice "auto" by default: vLLM needs a parser. Its
    settings file is the one tests/e2e/test_open_webui.py starts Open WebUI with."""
    services = stack()["services"]
    command = services["vllm"]["command"]
    assert "--enable-auto-tool-choice" in command
    assert "--tool-call-parser=hermes" in command
    webui = services["open-webui"]
    assert webui["env_file"] == ["open-webui.env"]
    assert (COMPOSE.parent / "open-webui.env").exists()
    settings = env_file(COMPOSE.parent / "open-webui.env")
    for task in ("TITLE", "TAGS", "FOLLOW_UP", "AUTOCOMPLETE"):
        assert settings[f"ENABLE_{task}_GENERATION"] == "false"
    assert webui["image"].endswith(":v0.12.4"), "the version the e2e test runs (scripts/lib.sh)"


def test_tracing_is_off_until_an_endpoint_is_set_and_the_profile_runs_a_backend() -> None:
    services = stack()["services"]
    for role in ("gateway", "worker", "worker-2", "worker-embed"):
        env = services[role]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "", f"{role}: off by default"
        assert env["TRACE_CONTENT"] == "false"
    assert services["phoenix"]["profiles"] == ["tracing"]
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    on = stack({**env_example(), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://phoenix:6006"})
    assert on["services"]["worker"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        "http://phoenix:6006"
    )


def test_the_embeddings_profile_serves_the_model_open_webui_searches_with() -> None:
    services = stack()["services"]
    engine, worker = services["vllm-embed"], services["worker-embed"]
    assert engine["profiles"] == worker["profiles"] == ["embeddings"]
    assert worker["environment"]["VLLM_URL"] == "http://vllm-embed:8000"
    assert worker["depends_on"]["vllm-embed"] == {"condition": "service_healthy"}
    cmd = engine["command"]
    assert cmd[cmd.index("--runner") + 1] == "pooling"
    assert cmd[cmd.index("--max-num-seqs") + 1] == worker["environment"]["MAX_ACTIVE"]
    served = cmd[cmd.index("--served-model-name") + 1]
    webui = env_file(COMPOSE.parent / "open-webui.env")
    assert webui["RAG_EMBEDDING_ENGINE"] == "openai"
    assert webui["RAG_EMBEDDING_MODEL"] == served, "Open WebUI embeds with the served model"


def test_the_two_models_profile_pairs_a_second_engine_with_its_own_worker() -> None:
    services = stack()["services"]
    engine, worker = services["vllm-2"], services["worker-2"]
    assert engine["profiles"] == worker["profiles"] == ["two-models"]
    assert worker["environment"]["VLLM_URL"] == "http://vllm-2:8000"
    assert worker["depends_on"]["vllm-2"] == {"condition": "service_healthy"}
    cmd = engine["command"]
    assert cmd[cmd.index("--max-num-seqs") + 1] == worker["environment"]["MAX_ACTIVE"]
    name = cmd[cmd.index("--served-model-name") + 1]
    first = services["vllm"]["command"]
    assert name != first[first.index("--served-model-name") + 1], "two models, two names"
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for s in (services["vllm"], engine)]  # fmt: skip
    assert gpus == [["0"], ["1"]], "one GPU each by default"
    assert engine["environment"]["VLLM_API_KEY"] == services["vllm"]["environment"]["VLLM_API_KEY"]
    Settings(**{k.lower(): v for k, v in worker["environment"].items()})


def test_the_ha_profile_adds_a_replica_and_three_sentinels_the_services_can_use() -> None:
    env = {**env_example(), "REDIS_HA_ANNOUNCE": "redis",
           "REDIS_SENTINELS": "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379",
           "REDIS_SENTINEL_PASSWORD": "test-sentinel-password"}  # fmt: skip
    services = stack(env)["services"]
    ha = ["redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"]
    assert all(services[name]["profiles"] == ["ha"] for name in ha)
    replica = services["redis-replica"]
    assert replica["environment"]["LLMQ_REDIS_REPLICA_OF"] == "redis"
    assert replica["command"] == services["redis"]["command"], "the same persistence"
    assert services["redis"]["environment"]["LLMQ_REDIS_ANNOUNCE"] == "redis"
    volumes = {s["volumes"][-1] for s in (services[n] for n in ha)}
    assert len(volumes) == 4, "each keeps its own data (a sentinel its view of the topology)"
    for name in ("gateway", "worker", "worker-2"):
        settings = Settings(**{k.lower(): v for k, v in services[name]["environment"].items()})
        assert [h for h, _ in settings.sentinel_addresses()] == ha[1:]
        assert settings.redis_sentinel_password is not None


def test_the_sentinel_entrypoint_watches_redis_with_its_password(tmp_path: Path) -> None:
    """sentinel.sh run as compose runs it (the image's docker-entrypoint.sh replaced by a
    stub on PATH): the config it writes watches `redis` with quorum 2 and a password."""
    stub = tmp_path / "bin/docker-entrypoint.sh"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    conf = tmp_path / "sentinel.conf"
    env = {
        "PATH": f"{stub.parent}:{os.environ['PATH']}",
        "REDIS_ADMIN_PASSWORD": "admin-0123456789abcdef",
        "REDIS_SENTINEL_PASSWORD": "sentinel-0123456789abcdef",
        "LLMQ_SENTINEL_CONF": str(conf),
    }
    out = subprocess.run(
        ["sh", str(COMPOSE.parent / "redis/sentinel.sh")], env=env, capture_output=True,
        text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["redis-server", str(conf), "--sentinel"]
    lines = conf.read_text().splitlines()
    assert "sentinel monitor mymaster redis 6379 2" in lines
    assert "requirepass sentinel-0123456789abcdef" in lines
    assert "sentinel auth-user mymaster admin" in lines
    assert not any(line.startswith("sentinel announce-ip") for line in lines)
