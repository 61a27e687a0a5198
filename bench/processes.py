"""Start the real processes (redis-server, simulator, gateway, worker, vLLM) on loopback.

Used by the benchmarks and, through tests/support/stack.py, by the tests. Runs from a
checkout (it is not installed): ``ROOT`` is the checkout, the processes' working directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from llmq.shared.sealing import new_key
from local.launch import (
    EMBED_VLLM_FLAGS,
    redis_argv,
    sentinel_argv,
    sentinel_config,
    vllm_argv,
    vllm_env,
)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    metrics_port: int = 0  # a gateway's Prometheus port (its API port does not serve them)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait, then kill whatever is left of the process group."""
        self.signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group: vLLM's engine processes die with its server."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and every live process of its group
        (a multi-process gateway's children included; Linux /proc)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == self.popen.pid:  # process group = the session we started
                total += int(fields[11]) + int(fields[12])
        return total / ticks


def spawn(
    name: str, args: list[str], logdir: Path, env: dict[str, str] | None = None, port: int = 0
) -> Proc:
    log = logdir / f"{name}-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:  # the child keeps its own descriptor
        popen = subprocess.Popen(  # own process group, so kill() reaches its children
            args,
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log, port)


def _pings(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def start_redis(
    logdir: Path,
    *,
    port: int = 0,
    data_dir: Path | None = None,
    persistent: bool = False,
    replica_of: int = 0,
) -> Proc:
    """A redis-server on loopback (``port`` 0: a free one); ``persistent``: AOF in
    ``data_dir``, so a restart on the same port and folder finds the queue again;
    ``replica_of``: a replica of the primary on that port."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found: run scripts/test.sh, which installs it")
    port = port or free_port()
    folder = str(data_dir or logdir)
    argv = redis_argv(port, folder, persistent=persistent, replica_of=replica_of)
    proc = spawn("redis", argv, logdir, port=port)
    wait_for(lambda: _pings(port), 10, "redis-server")
    return proc


def start_sentinel(
    logdir: Path, master_port: int, *, down_after_ms: int = 2000, failover_timeout_ms: int = 10_000
) -> Proc:
    """A sentinel on a free loopback port watching the primary on ``master_port``."""
    port = free_port()
    folder = logdir / f"sentinel-{port}"
    folder.mkdir()
    conf = folder / "sentinel.conf"
    conf.write_text(
        sentinel_config(
            port, master_port, down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms
        )
    )
    proc = spawn("sentinel", sentinel_argv(str(conf)), logdir, port=port)
    wait_for(lambda: _pings(port), 10, "redis-sentinel")
    return proc


def start_sim(logdir: Path, *extra: str) -> Proc:
    port = free_port()
    proc = spawn(
        "sim",
        [sys.executable, "-m", "bench.engine_sim", "--port", str(port), *extra],
        logdir,
        port=port,
    )
    wait_for(lambda: httpx.get(proc.url + "/health").status_code == 200, 20, "simulator")
    return proc


# One payload key for every process this harness starts (they must share it); the tests
# of rotation and of a missing key pass their own PAYLOAD_KEYS.
PAYLOAD_KEY = new_key()


def service_env(redis_url: str, engine_url: str, **overrides: object) -> dict[str, str]:
    base = {
        "PAYLOAD_KEYS": PAYLOAD_KEY,
        "REDIS_URL": redis_url,
        "VLLM_URL": engine_url,
        "LOG_LEVEL": "INFO",
        # Open by default in tests and benchmarks; the tenant tests turn keys on.
        "AUTH": "none",
        "PASSTHROUGH_EXTRA": '["sim"]',  # the simulator's per-request knobs
        "WORKER_METRICS_PORT": "0",
        "REGISTRY_REFRESH_S": "0.2",
    }
    return {**base, **{k.upper(): str(v) for k, v in overrides.items()}}


def start_worker(logdir: Path, env: dict[str, str]) -> Proc:
    return spawn("worker", [sys.executable, "-m", "llmq.worker"], logdir, env)


def _up_or_gone(proc: Proc) -> bool:
    return not proc.alive() or httpx.get(proc.url + "/health").status_code == 200


def start_gateway(
    logdir: Path, env: dict[str, str], wait_ready: bool = True, wrapper: Sequence[str] = ()
) -> Proc:
    """A gateway on free loopback ports (``wrapper``: a command it runs under, e.g.
    ``prlimit --nofile=1024:1024 --``). ``free_port`` can race with another process that
    takes the port before the gateway binds it: then the gateway exits, and is started
    again on other ports (up to three tries). A gateway that does not become healthy is
    killed (and reaped) before the error is raised."""
    for attempt in range(3):
        port, metrics_port = free_port(), free_port()
        proc = spawn(
            "gateway",
            [*wrapper, sys.executable, "-m", "llmq.gateway"],
            logdir,
            {
                **env,
                "GATEWAY_PORT": str(port),
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_METRICS_PORT": str(metrics_port),
            },
            port,
        )
        proc.metrics_port = metrics_port
        if not wait_ready:
            return proc
        try:
            wait_for(partial(_up_or_gone, proc), 30, f"gateway health ({proc.output()[-2000:]})")
        except BaseException:
            proc.kill()
            raise
        if proc.alive():
            return proc
        proc.kill()  # reaps it
        if "address already in use" not in proc.output() or attempt == 2:
            raise RuntimeError(f"the gateway exited at start:\n{proc.output()[-2000:]}")
    raise AssertionError("unreachable")


BUNDLED_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"  # the local run's embedding model (scripts/lib.sh)


def engine_paths() -> tuple[Path, Path]:
    """The engine venv's python and the bundled model folder (as scripts/*.sh install them)."""
    python = Path(os.environ.get("LLMQ_ENGINE_PYTHON", ROOT / ".cache/engine-venv/bin/python"))
    model = Path(os.environ.get("LLMQ_MODEL_DIR", ROOT / ".cache/models" / BUNDLED_MODEL))
    return python, model


def start_otlp_receiver(logdir: Path) -> Proc:
    """``bench.otlp_receiver`` on a free loopback port: OTLP/HTTP in, ``GET /spans`` out."""
    port = free_port()
    proc = spawn("otlp", [sys.executable, "-m", "bench.otlp_receiver", "--port", str(port)],
                 logdir, port=port)  # fmt: skip
    wait_for(lambda: httpx.get(proc.url + "/health").status_code == 200, 30, "the OTLP receiver")
    return proc


def embed_model_dir() -> Path:
    """The embedding model's folder (as scripts/*.sh prepare it)."""
    return Path(os.environ.get("LLMQ_EMBED_MODEL_DIR", ROOT / ".cache/models" / EMBED_MODEL))


def spawn_vllm_embedding(logdir: Path, *, max_num_seqs: int, api_key: str | None = None) -> Proc:
    """vLLM's CPU build serving the embedding model with the pooling runner, as the local run
    does (256 tokens: the model's own limit; 1 GiB of KV cache)."""
    python, _ = engine_paths()
    port = free_port()
    args = vllm_argv(
        str(python), str(embed_model_dir()), EMBED_MODEL, port, max_num_seqs=max_num_seqs,
        max_model_len=256, tool_parser="none", extra=EMBED_VLLM_FLAGS,
    )  # fmt: skip
    env = {**vllm_env("1"), **({"VLLM_API_KEY": api_key} if api_key else {})}
    return spawn("vllm-embed", args, logdir, env, port)


def spawn_vllm(
    logdir: Path,
    *,
    max_model_len: int,
    max_num_seqs: int,
    api_key: str | None = None,
    names: str = BUNDLED_MODEL,
    traces_to: str = "",
) -> Proc:
    """Start vLLM's CPU build serving the bundled model (float32, eager: quick to start)
    under ``names`` (comma-separated served names); with ``api_key``, its /v1 routes need
    it (vLLM reads VLLM_API_KEY); with ``traces_to`` (an OTLP/HTTP traces URL), its spans go
    there (``--otlp-traces-endpoint``)."""
    python, model = engine_paths()
    port = free_port()
    args = vllm_argv(
        str(python),
        str(model),
        names,
        port,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        extra=("--otlp-traces-endpoint", traces_to) if traces_to else (),
    )
    env = {**vllm_env("1"), **({"VLLM_API_KEY": api_key} if api_key else {})}
    if traces_to:
        env.update(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf", OTEL_SERVICE_NAME="vllm")
    return spawn("vllm", args, logdir, env, port)


@dataclass
class LocalStack:
    redis: Proc
    sim: Proc
    worker: Proc
    gateway: Proc


@contextlib.contextmanager
def local_stack(
    prefix: str, sim_args: Sequence[str] = (), **settings: object
) -> Iterator[LocalStack]:
    """For a benchmark: redis-server, the simulator (``sim_args``), one worker and one
    gateway (``settings`` as environment) on loopback, logs in a temporary folder; all of
    it killed on exit."""
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        logdir = Path(tmp)
        try:
            redis = start_redis(logdir)
            procs.append(redis)
            sim = start_sim(logdir, *sim_args)
            procs.append(sim)
            env = service_env(f"redis://127.0.0.1:{redis.port}/0", sim.url, **settings)
            worker = start_worker(logdir, env)
            procs.append(worker)
            gateway = start_gateway(logdir, env)
            procs.append(gateway)
            yield LocalStack(redis, sim, worker, gateway)
        finally:
            for p in reversed(procs):
                p.kill()
