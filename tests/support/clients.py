"""Small HTTP clients for the tests: request bodies, an SSE reader, simulator controls."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import redis

from bench.loadgen import StreamResult, stream_chat
from tests.support.stack import ROOT, Stack, wait_for

__all__ = ["StreamResult", "stream_chat"]  # (the load generator's, used by many tests)

MODEL = "sim-model"


def sse_bytes(*objs: object, done: bool = True) -> bytes:
    """An engine's SSE body: one ``data:`` event per object, then ``[DONE]``."""
    out = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)
    return out + (b"data: [DONE]\n\n" if done else b"")


def body(stream: bool = True, model: str = MODEL, **sim: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
    }
    if sim:
        b["sim"] = sim
    return b


def members(rdb: redis.Redis, key: str) -> list[str]:
    """A sorted set's members, decoded (redis-py's sync typing says "maybe awaitable")."""
    raw = cast(list[bytes], rdb.zrange(key, 0, -1))
    return [m.decode() for m in raw]


def get_json(rdb: redis.Redis, key: str) -> Any:
    """A JSON string value, parsed; None when the key does not exist."""
    raw = cast(bytes | None, rdb.get(key))
    return None if raw is None else json.loads(raw)


def sim_stats(sim_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(sim_url + "/sim/stats").json()
    return stats


def release(sim_url: str, name: str) -> None:
    """Let the simulator's streams held under ``name`` go on (see bench.engine_sim)."""
    httpx.post(f"{sim_url}/sim/release/{name}").raise_for_status()


def fail(sim_url: str, name: str) -> None:
    """Break off the simulator's streams held under ``name``, as a crashing engine would."""
    httpx.post(f"{sim_url}/sim/fail/{name}").raise_for_status()


def held(sim_url: str, name: str) -> int:
    return int(sim_stats(sim_url)["held"].get(name, 0))


def wait_held(sim_url: str, name: str, count: int, within: float = 10.0) -> None:
    """Poll until exactly ``count`` engine requests are held under ``name``."""
    wait_for(lambda: held(sim_url, name) == count, within, f"{count} request(s) held as {name!r}")


def admitted(rdb: Any) -> int:
    """Admitted, unfinished jobs of every model (a sync redis client)."""
    return sum(int(rdb.zcard(k)) for k in rdb.scan_iter(match="llmq:model:*:admitted"))


def assert_drained(rdb: Any, within: float = 3.0) -> None:
    """No admitted place and no queued job left. The worker releases a job's place and arq
    removes it from the queue just after the last event went out, so allow a moment."""
    wait_for(
        lambda: admitted(rdb) == 0 and rdb.zcard("llmq:queue") == 0,
        within,
        f"Redis to drain (admitted={admitted(rdb)}, queue={rdb.zcard('llmq:queue')})",
    )


@dataclass
class Frames:
    """A raw SSE answer: each event's ``id`` (None when it has none) and data."""

    status: int
    frames: list[tuple[int | None, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def ids(self) -> list[int]:
        return [i for i, _ in self.frames if i is not None]

    @property
    def last_id(self) -> int:
        return self.ids[-1]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for _, d in self.frames if d != "[DONE]"]

    @property
    def text(self) -> str:
        return StreamResult(self.status, {}, self.chunks).text

    @property
    def done(self) -> bool:
        return bool(self.frames) and self.frames[-1][1] == "[DONE]"


async def read_frames(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_chunks: int | None = None,
    **kw: Any,
) -> Frames:
    """Read an SSE answer frame by frame, keeping each frame's ``id``; stop (drop the
    connection) after ``max_chunks`` data frames."""
    async with client.stream(method, url, **kw) as resp:
        out = Frames(resp.status_code)
        if resp.status_code != 200:
            out.body = await resp.aread()
            return out
        event_id: int | None = None
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                out.frames.append((event_id, line[6:]))
                event_id = None
                if max_chunks is not None and len(out.frames) >= max_chunks:
                    return out
        return out


def cli(stack: Stack, module: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run an operator CLI (``python -m <module>``) against the stack's Redis (``env``: more
    of its environment, e.g. PAYLOAD_KEYS)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": stack.redis_url, **env},
    )


def keys_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(stack, "llmq.cli.llmq_keys", *args)


def new_key(stack: Stack, name: str, *flags: str) -> str:
    """Create a key with the operator CLI; its secret is the last line of stdout."""
    res = keys_cli(stack, "create", name, *flags)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def everything(rdb: Any) -> dict[bytes, bytes]:
    """Every key of the Redis with its value(s) flattened to bytes (``rdb``: a sync
    redis.Redis, typed Any: its stubs say every reply may be awaitable)."""
    out: dict[bytes, Any] = {}
    for key in rdb.scan_iter(count=1000):
        kind = rdb.type(key)
        if kind == b"string":
            value = rdb.get(key) or b""
        elif kind == b"hash":
            value = b" ".join(k + b"=" + v for k, v in rdb.hgetall(key).items())
        elif kind == b"zset":
            value = b" ".join(m for m, _ in rdb.zrange(key, 0, -1, withscores=True))
        elif kind == b"set":
            value = b" ".join(rdb.smembers(key))
        elif kind == b"list":
            value = b" ".join(rdb.lrange(key, 0, -1))
        elif kind == b"stream":
            value = b" ".join(v for _, fields in rdb.xrange(key) for v in fields.values())
        else:
            value = kind
        out[key] = value
    return out
