"""A small streaming load generator: N chat requests at a fixed concurrency, timed per token."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmq.shared import sse


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int  # the usage's completion tokens when the stream reported them, else deltas
    ok: bool
    text: str = ""
    deltas: int = 0  # content deltas received (several tokens each from a batching engine)


@dataclass
class RunResult:
    samples: list[Sample]
    wall_s: float

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    def pct(self, attr: str, q: float) -> float:
        values: list[float] = sorted(float(getattr(s, attr)) for s in self.ok)
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    @property
    def req_per_s(self) -> float:
        return len(self.ok) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.ok) / self.wall_s


def merge(results: list[RunResult]) -> RunResult:
    """Batches run one after another, as one result (samples joined, wall times added)."""
    return RunResult([s for r in results for s in r.samples], sum(r.wall_s for r in results))


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    usage_tokens = -1
    parts: list[str] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Sample(0, time.perf_counter() - t0, 0, False)
        try:
            async for chunk in sse.events(resp.aiter_lines()):
                choices = chunk.get("choices") or []
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                content = choices[0].get("delta", {}).get("content") if choices else None
                if content:
                    parts.append(content)
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
        except sse.StreamEndedEarly:
            return Sample(ttft or 0.0, time.perf_counter() - t0, tokens, False)
    total = time.perf_counter() - t0
    counted = usage_tokens if usage_tokens >= 0 else tokens
    return Sample(ttft or 0.0, total, counted, ttft is not None, "".join(parts), tokens)


async def run(url: str, body: dict[str, Any], requests: int, concurrency: int) -> RunResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        samples: list[Sample] = []

        async def lane() -> None:
            while not queue.empty():
                queue.get_nowait()
                samples.append(await one(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return RunResult(samples, time.perf_counter() - t0)


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
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    max_chunks: int | None = None,
    headers: dict[str, str] | None = None,
) -> StreamResult:
    """POST and read the SSE stream (or the error body); stop early after ``max_chunks``."""
    path = url + "/v1/chat/completions"
    async with client.stream("POST", path, json=payload, headers=headers) as resp:
        result = StreamResult(resp.status_code, dict(resp.headers))
        if resp.status_code != 200:
            result.error_body = json.loads(await resp.aread())
            return result
        try:
            async for chunk in sse.events(resp.aiter_lines()):
                result.chunks.append(chunk)
                if max_chunks is not None and len(result.chunks) >= max_chunks:
                    return result
        except sse.StreamEndedEarly:
            return result
        result.done = True
        return result
