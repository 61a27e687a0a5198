"""Compose's Redis lock-down, run for real: redis-server started through compose's own
entrypoint script (compose/redis/acl.sh), with its ACL users, and a gateway and a worker
that log in as their roles. Clients without a password get nothing; the roles cannot run
dangerous commands or touch keys and channels outside ``llmq:*``/``arq:*``; and a whole
workload (API keys, plain and streamed chats, a cancel, a worker killed mid-stream and
reaped) runs without Redis refusing a single command (its ACL LOG stays empty)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from local.launch import redis_argv
from tests.support.clients import (
    StreamResult,
    assert_drained,
    body,
    stream_chat,
    wait_held,
)
from tests.support.stack import (
    ROOT,
    Proc,
    Stack,
    free_port,
    spawn,
    stack_for,
    start_ha_redis,
    wait_for,
)

pytestmark = pytest.mark.integration

PASSWORDS = {
    "admin": "admin-pw-0123456789abcdef",
    "gateway": "gateway-pw-0123456789abcdef",
    "worker": "worker-pw-0123456789abcdef",
}
ENV = {f"REDIS_{role.upper()}_PASSWORD": pw for role, pw in PASSWORDS.items()}


def _client(port: int, role: str | None) -> redis.Redis:
    if role is None:
        return redis.Redis(port=port, socket_timeout=5)
    return redis.Redis(port=port, username=role, password=PASSWORDS[role], socket_timeout=5)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    data = tmp_path_factory.mktemp("acl-redis")
    port = free_port()
    argv = ["sh", str(ROOT / "compose/redis/acl.sh"), *redis_argv(port, str(data), persistent=True)]
    env = {**ENV, "LLMQ_REDIS_ACL_FILE": str(data / "users.acl")}
    proc = spawn("redis-acl", argv, data, env, port)

    def up() -> bool:
        try:
            return bool(_client(port, "admin").ping())
        except redis.RedisError:
            return False

    wait_for(up, 10, "redis-server with ACL users")
    yield proc
    proc.kill()


@pytest.fixture
def admin(acl_redis: Proc) -> Iterator[redis.Redis]:
    client = _client(acl_redis.port, "admin")
    client.flushall()
    client.acl_log_reset()
    yield client
    client.close()


@pytest.fixture
def acl_stack(
    acl_redis: Proc, admin: redis.Redis, sim: Proc, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    httpx.post(sim.url + "/sim/reset")
    with stack_for(request, f"redis://127.0.0.1:{acl_redis.port}/0", sim.url, logdir) as s:
        yield s


def test_the_acl_file_holds_no_password(acl_redis: Proc) -> None:
    acl = (Path(acl_redis.log).parent / "users.acl").read_text()
    assert "user default off" in acl
    assert not any(pw in acl for pw in PASSWORDS.values())


def test_without_a_password_nothing_is_allowed(acl_redis: Proc) -> None:
    with pytest.raises(redis.AuthenticationError):
        _client(acl_redis.port, None).get("llmq:queue")
    wrong = redis.Redis(port=acl_redis.port, username="gateway", password="x" * 20)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()


@pytest.mark.parametrize("role", ["gateway", "worker"])
def test_roles_cannot_run_dangerous_commands_or_leave_their_keys(
    acl_redis: Proc, admin: redis.Redis, role: str
) -> None:
    client = _client(acl_redis.port, role)
    assert client.set("llmq:acl-probe", "1")  # its own keys: fine
    refused = [
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("SHUTDOWN",),
        ("ACL", "LIST"),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("SCRIPT", "FLUSH"),
        ("MONITOR",),
        ("SET", "other:key", "1"),
        ("GET", "session:1"),
        ("PUBLISH", "other-channel", "x"),
        ("EVAL", "return redis.call('GET', 'other:key')", "0"),
    ]
    for command in refused:
        with pytest.raises(redis.ResponseError, match=r"permission|can't access"):
            client.execute_command(*command)
    assert admin.dbsize() == 1, "nothing was flushed or written outside llmq:*"


def test_the_service_runs_under_its_roles_without_one_refusal(
    acl_stack: Stack, admin: redis.Redis, sim: Proc
) -> None:
    as_gateway: dict[str, Any] = {"redis_username": "gateway"}
    as_gateway["redis_password"] = PASSWORDS["gateway"]
    as_worker: dict[str, Any] = {"redis_username": "worker"}
    as_worker["redis_password"] = PASSWORDS["worker"]
    keys = subprocess.run(
        [sys.executable, "-m", "llmq.cli.llmq_keys", "create", "app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": "/usr/bin:/bin",
            "REDIS_URL": acl_stack.redis_url,
            "REDIS_USERNAME": "gateway",
            "REDIS_PASSWORD": PASSWORDS["gateway"],
        },
    )
    assert keys.returncode == 0, keys.stderr
    secret = keys.stdout.strip().splitlines()[-1]
    victim = acl_stack.worker(max_active=2, **as_worker)
    gw = acl_stack.gateway(auth="keys", **as_gateway)

    async def run() -> tuple[httpx.Response, StreamResult, StreamResult, StreamResult]:
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(timeout=60, headers=headers) as c:
            plain = await c.post(gw.url + "/v1/chat/completions", json=body(stream=False))
            streamed = await stream_chat(c, gw.url, body(tokens=4))
            cancelled = await stream_chat(
                c, gw.url, body(tokens=20, hold="cut", hold_after=2), max_chunks=2
            )
            lost_task = asyncio.create_task(stream_chat(c, gw.url, body(tokens=20, hold="kill")))
            await asyncio.to_thread(wait_held, sim.url, "kill", 1)
            victim.popen.send_signal(signal.SIGKILL)
            lost = await asyncio.wait_for(lost_task, 30)
        return plain, streamed, cancelled, lost

    plain, streamed, cancelled, lost = asyncio.run(run())
    assert plain.status_code == 200, plain.text
    assert streamed.done
    assert streamed.text == "tok0 tok1 tok2 tok3 "
    assert cancelled.status == 200
    assert [e["code"] for e in lost.sse_errors] == ["worker_lost"]
    acl_stack.worker(**as_worker)
    wait_for(
        lambda: httpx.get(gw.url + "/health", timeout=10).status_code == 200,
        15,
        "the replacement worker to be live",
    )
    assert_drained(admin, within=15)
    refused = admin.acl_log()
    assert refused == [], f"Redis refused commands the service sent: {refused}"


def test_the_gateway_may_wait_for_replicas_and_read_replication(
    acl_redis: Proc, admin: redis.Redis
) -> None:
    """REDIS_MIN_REPLICAS_ACK's marker and WAIT, and the replication gauges' INFO."""
    gateway = _client(acl_redis.port, "gateway")
    assert gateway.set("llmq:replicated", "1", px=60_000)
    assert gateway.execute_command("WAIT", 0, 10) == 0
    info = cast(dict[str, Any], gateway.info("replication"))
    assert info["role"] == "master"


def _entrypoint(script: str, env: dict[str, str], tmp: Path) -> str:
    """Run a Redis entrypoint script with a stub for the command it ends with (``true``, or
    for sentinel.sh a docker-entrypoint.sh stub on PATH); returns its stderr."""
    stub = tmp / "bin/docker-entrypoint.sh"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    argv = ["sh", str(ROOT / "compose/redis" / script)] + (["true"] if script == "acl.sh" else [])
    full_env = {"PATH": f"{stub.parent}:/usr/local/bin:/usr/bin:/bin", **env}
    out = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_a_starting_server_or_sentinel_takes_the_primary_the_sentinels_name(
    logdir: Path, tmp_path: Path
) -> None:
    """The Helm chart's Redis (LLMQ_SENTINEL_DISCOVER): after a failover, a restarting
    former primary (pod 0, whose fallback is itself) comes back as a replica of the promoted
    server, not as a second primary; on a first install (no sentinel answers) pod 0 is the
    primary and the others replicate from it; a new sentinel watches the current primary."""
    ha = start_ha_redis(logdir)
    try:
        old = ha.kill_primary()
        new = ha.wait_new_primary(old)
        sentinels = f"127.0.0.1:{ha.sentinels[0].port}"
        nobody = f"127.0.0.1:{free_port()}"

        def replicaof(case: str, discover: str, announce: str, port: int = 6379) -> list[str]:
            folder = tmp_path / case
            env = {
                **ENV,
                "LLMQ_REDIS_ACL_FILE": str(folder / "users.acl"),
                "LLMQ_REDIS_ANNOUNCE": announce,
                "LLMQ_REDIS_PORT": str(port),
                "LLMQ_REDIS_REPLICA_OF": "pod-0",  # the chart's fallback: the first pod
                "LLMQ_SENTINEL_DISCOVER": discover,
            }
            _entrypoint("acl.sh", env, folder)
            lines = (folder / "ha.conf").read_text().splitlines()
            return [line for line in lines if line.startswith("replicaof")]

        assert replicaof("restarted-pod-0", sentinels, "pod-0") == [f"replicaof 127.0.0.1 {new}"]
        assert replicaof("the-promoted-one", sentinels, "127.0.0.1", new) == []
        assert replicaof("first-install-pod-0", nobody, "pod-0") == []
        assert replicaof("first-install-pod-1", nobody, "pod-1") == ["replicaof pod-0 6379"]

        conf = tmp_path / "sentinel.conf"
        env = {
            "REDIS_ADMIN_PASSWORD": PASSWORDS["admin"],
            "REDIS_SENTINEL_PASSWORD": "sentinel-pw-0123456789abcdef",
            "LLMQ_SENTINEL_CONF": str(conf),
            "LLMQ_REDIS_PRIMARY": "pod-0",
            "LLMQ_SENTINEL_ANNOUNCE": "sentinel-3",
            "LLMQ_SENTINEL_DISCOVER": sentinels,
        }
        _entrypoint("sentinel.sh", env, tmp_path)
        lines = conf.read_text().splitlines()
        assert f"sentinel monitor mymaster 127.0.0.1 {new} 2" in lines
        assert "sentinel announce-ip sentinel-3" in lines
    finally:
        ha.close()
