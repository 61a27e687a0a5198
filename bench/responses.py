"""What the Responses API adds to a request over chat completions, on the same stack.

    python -m bench.responses [--conc 1,16] [--rounds 3] [--per-lane 8] [--tokens 64]

Starts redis-server, the engine simulator (TTFT 20 ms, ITL 5 ms), one worker and one
gateway on loopback. For each concurrency c it sends the same prompt, in alternating
batches (so that every path sees the same machine noise), as:

- ``chat``: ``POST /v1/chat/completions`` streamed (time to the first content delta);
- ``responses``: ``POST /v1/responses`` streamed, not stored (time to the first
  ``response.output_text.delta``; the first event, ``response.created``, comes with it:
  the status waits for the job's first token, as chat's does);
- ``stored``: the same, stored (the default: the job's events logged);
- ``background``: ``POST /v1/responses`` with ``background: true`` (answered at once),
  then ``GET /v1/responses/{id}?stream=true`` (time from the POST to the first delta of
  that stream).

It prints per path and c: requests/s, time to first delta p50/p99 and what it adds over
chat at p50, and errors (a stream that failed or whose text differs from chat's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.processes import local_stack

PATHS = ("chat", "responses", "stored", "background")
PROMPT = "Say something."


@dataclass
class Sample:
    first_s: float  # to the first content delta
    text: str
    ok: bool


@dataclass
class PathResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    def pct(self, q: int) -> float:
        values = sorted(s.first_s for s in self.samples if s.ok)
        if len(values) < 2:
            return values[0] if values else float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def _sse(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def chat(client: httpx.AsyncClient, url: str, tokens: int) -> Sample:
    body = {"model": "sim-model", "stream": True, "sim": {"tokens": tokens},
            "messages": [{"role": "user", "content": PROMPT}]}  # fmt: skip
    t0, first, parts = time.perf_counter(), 0.0, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return Sample(0, "", False)
        async for chunk in _sse(resp):
            choices = chunk.get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            if content:
                first = first or time.perf_counter() - t0
                parts.append(content)
    return Sample(first, "".join(parts), first > 0)


async def _response_stream(resp: httpx.Response, t0: float) -> Sample:
    first, parts, completed = 0.0, [], False
    async for event in _sse(resp):
        if event["type"] == "response.output_text.delta":
            first = first or time.perf_counter() - t0
            parts.append(event["delta"])
        completed = completed or event["type"] == "response.completed"
    return Sample(first, "".join(parts), first > 0 and completed)


def _responses_body(tokens: int, **fields: Any) -> dict[str, Any]:
    return {"model": "sim-model", "input": PROMPT, "sim": {"tokens": tokens}, **fields}


async def responses(client: httpx.AsyncClient, url: str, tokens: int, store: bool) -> Sample:
    body = _responses_body(tokens, stream=True, store=store)
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/responses", json=body) as resp:
        if resp.status_code != 200:
            return Sample(0, "", False)
        return await _response_stream(resp, t0)


async def background(client: httpx.AsyncClient, url: str, tokens: int) -> Sample:
    t0 = time.perf_counter()
    created = await client.post(
        url + "/v1/responses", json=_responses_body(tokens, background=True)
    )
    if created.status_code != 200:
        return Sample(0, "", False)
    rid = created.json()["id"]
    params = {"stream": "true"}
    async with client.stream("GET", f"{url}/v1/responses/{rid}", params=params) as resp:
        if resp.status_code != 200:
            return Sample(0, "", False)
        return await _response_stream(resp, t0)


Runner = Callable[[httpx.AsyncClient], Awaitable[Sample]]


async def run(runner: Runner, requests: int, concurrency: int) -> PathResult:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        left = list(range(requests))
        out = PathResult()

        async def lane() -> None:
            while left:
                left.pop()
                out.samples.append(await runner(client))

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        out.wall_s = time.perf_counter() - t0
        return out


async def measure(
    url: str, c: int, rounds: int, per_lane: int, tokens: int
) -> dict[str, PathResult]:
    runners: dict[str, Runner] = {
        "chat": lambda cl: chat(cl, url, tokens),
        "responses": lambda cl: responses(cl, url, tokens, store=False),
        "stored": lambda cl: responses(cl, url, tokens, store=True),
        "background": lambda cl: background(cl, url, tokens),
    }
    totals = {p: PathResult() for p in PATHS}
    await run(runners["chat"], c, c)  # warm-up: connections, caches
    for _ in range(rounds):
        for path in PATHS:
            got = await run(runners[path], c * per_lane, c)
            totals[path].samples += got.samples
            totals[path].wall_s += got.wall_s
    return totals


def report(c: int, totals: dict[str, PathResult], expected: str) -> list[str]:
    base = totals["chat"].pct(50)
    rows = []
    for path in PATHS:
        r = totals[path]
        ok = [s for s in r.samples if s.ok and s.text == expected]
        p50, p99 = r.pct(50), r.pct(99)
        rows.append(
            f"{c:>4} {path:<11} {len(ok) / r.wall_s:>8.1f} {p50 * 1000:>9.1f} {p99 * 1000:>9.1f}"
            f" {(p50 - base) * 1000:>+10.1f} {len(r.samples) - len(ok):>5}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conc", default="1,16")
    ap.add_argument("--rounds", type=int, default=3, help="alternating batches per path")
    ap.add_argument("--per-lane", type=int, default=8, help="requests per lane per batch")
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    sim_args = ("--ttft-ms", "20", "--itl-ms", "5", "--tokens", str(a.tokens))
    expected = "".join(f"tok{i} " for i in range(a.tokens))
    with local_stack("llmq-responses-", sim_args, max_active=64) as s:
        print(f"engine simulator: TTFT 20 ms, ITL 5 ms, {a.tokens} tokens; "
              f"{a.rounds} alternating rounds of {a.per_lane} requests per lane")  # fmt: skip
        print("   c path         req/s  first p50  first p99  added p50   err   (ms)")
        for c in (int(x) for x in a.conc.split(",")):
            totals = asyncio.run(measure(s.gateway.url, c, a.rounds, a.per_lane, a.tokens))
            for row in report(c, totals, expected):
                print(row)


if __name__ == "__main__":
    main()
