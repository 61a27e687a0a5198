"""Small clients for the integration tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL = "sim-model"


def body(stream: bool = True, **sim: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
    }
    if sim:
        b["sim"] = sim
    return b


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error_body: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(
            (c.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
            for c in self.chunks
            if c.get("choices")
        )

    @property
    def sse_errors(self) -> list[dict[str, Any]]:
        return [c["error"] for c in self.chunks if "error" in c]


async def stream_chat(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], max_chunks: int | None = None
) -> StreamResult:
    """POST and read the SSE stream (or the error body); stop early after ``max_chunks``."""
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as resp:
        result = StreamResult(resp.status_code, dict(resp.headers))
        if resp.status_code != 200:
            result.error_body = json.loads(await resp.aread())
            return result
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                result.done = True
                break
            result.chunks.append(json.loads(data))
            if max_chunks is not None and len(result.chunks) >= max_chunks:
                break
        return result


def sim_stats(sim_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(sim_url + "/sim/stats").json()
    return stats


def assert_drained(rdb: Any, within: float = 3.0) -> None:
    """No admitted place and no queued job left. The worker releases a job's place and arq
    removes it from the queue just after the last event went out, so allow a moment."""
    from bench.processes import wait_for

    wait_for(
        lambda: rdb.zcard("llmq:admitted") == 0 and rdb.zcard("llmq:queue") == 0,
        within,
        f"Redis to drain (admitted={rdb.zcard('llmq:admitted')}, queue={rdb.zcard('llmq:queue')})",
    )
