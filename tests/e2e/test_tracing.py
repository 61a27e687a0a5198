"""One trace through the real engine: vLLM (started with ``--otlp-traces-endpoint``) makes
its request span a child of the ``traceparent`` the worker's engine call sends, so the
engine's own view (queue time, prefill, decode) sits inside the request's trace."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest

from tests.support.clients import stream_chat
from tests.support.stack import BUNDLED_MODEL, Proc, Stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_vllms_span_is_inside_the_requests_trace(stack: Stack, otlp: Proc) -> None:
    traced: dict[str, Any] = {
        "otel_exporter_otlp_endpoint": otlp.url,
        "otel_bsp_schedule_delay": "100",
    }
    stack.worker(**traced)
    gw = stack.gateway(**traced)
    trace_id = secrets.token_hex(16)
    ask = {"model": BUNDLED_MODEL, "stream": True, "max_tokens": 8,
           "messages": [{"role": "user", "content": "Say hello."}]}  # fmt: skip

    async def run() -> Any:
        async with httpx.AsyncClient(timeout=120) as c:
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            return await stream_chat(c, gw.url, ask, headers=headers)

    answer = asyncio.run(run())
    assert answer.status == 200
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        every = httpx.get(otlp.url + "/spans").json()
        found[:] = [s for s in every if s["trace_id"] == trace_id]
        return any(s["service"] == "vllm" for s in found) and any(
            s["name"] == "POST" for s in found
        )

    wait_for(arrived, 60, "vLLM's span in the request's trace")
    engine_call = next(s for s in found if s["name"] == "POST" and s["kind"] == "client")
    engine = next(s for s in found if s["service"] == "vllm")
    assert engine["parent_span_id"] == engine_call["span_id"]
    job = next(s for s in found if s["span_id"] == engine_call["parent_span_id"])
    assert job["name"] == f"process {BUNDLED_MODEL}"
    chat = next(s for s in found if s["span_id"] == job["parent_span_id"])
    assert chat["attributes"]["gen_ai.usage.output_tokens"] == 8
    tree = "\n".join(
        f"{s['service']:>14}  {s['name']}" for s in sorted(found, key=lambda s: s["start_ns"])
    )
    print(f"trace {trace_id}:\n{tree}")
