"""Traces across the queue on real processes: gateways and a worker exporting OTLP to a real
receiver (``bench.otlp_receiver``, decoding what the SDK's exporters send with
``opentelemetry-proto``): one trace per request from the gateway's server span through the
queue to the worker's job and its engine call; a client's ``traceparent`` honoured;
refusals and a lost worker in their spans; no prompt in any span."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import body, release, sim_stats, stream_chat, wait_held
from tests.support.stack import Proc, Stack, start_otlp_receiver, wait_for

pytestmark = pytest.mark.integration

Span = dict[str, Any]


@pytest.fixture(scope="module")
def otlp(logdir: Path) -> Iterator[Proc]:
    proc = start_otlp_receiver(logdir)
    yield proc
    proc.kill()


@pytest.fixture
def traced(otlp: Proc) -> dict[str, Any]:
    """The settings of a traced process: the standard OTEL_* variables, a short export delay."""
    httpx.post(otlp.url + "/reset").raise_for_status()
    return {"otel_exporter_otlp_endpoint": otlp.url, "otel_bsp_schedule_delay": "100"}


def spans(otlp: Proc) -> list[Span]:
    got: list[Span] = httpx.get(otlp.url + "/spans").json()
    return got


def trace_of(otlp: Proc, trace_id: str, ready: Callable[[list[Span]], bool]) -> list[Span]:
    """The spans of one trace, once ``ready`` says they are all in."""
    found: list[Span] = []

    def arrived() -> bool:
        found[:] = [s for s in spans(otlp) if s["trace_id"] == trace_id]
        return ready(found)

    wait_for(arrived, 30, f"the spans of trace {trace_id}")
    return found


def one(found: list[Span], **match: Any) -> Span:
    hits = [s for s in found if all(s.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, [(s["name"], s["service"], s["kind"]) for s in found])
    return hits[0]


def names(found: list[Span]) -> set[str]:
    return {s["name"] for s in found}


def test_a_streamed_chat_is_one_trace_from_the_client_through_the_queue_to_the_engine(
    stack: Stack, traced: dict[str, Any], otlp: Proc, sim: Proc, rdb: redis.Redis
) -> None:
    stack.worker(**traced)
    gws = [stack.gateway(**traced) for _ in range(2)]
    canary = "PROMPT-" + secrets.token_hex(8)
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    ask = body(stream=True, record="traced")
    ask["messages"][0]["content"] = canary
    ask["stream_options"] = {"include_usage": True}

    async def run() -> tuple[Any, Any]:
        async with httpx.AsyncClient(timeout=60) as c:
            headers = {"traceparent": f"00-{client_trace}-{client_span}-01"}
            first = await stream_chat(c, gws[0].url, ask, headers=headers)
            second = await stream_chat(c, gws[1].url, body(stream=True))
            return first, second

    first, second = asyncio.run(run())
    assert first.status == second.status == 200
    job_id = first.headers["x-request-id"]

    def complete(found: list[Span]) -> bool:
        return {"chat sim-model", "process sim-model", "POST"} <= names(found) and any(
            s["kind"] == "server" for s in found
        )

    found = trace_of(otlp, client_trace, complete)
    server = one(found, kind="server", service="llmq-gateway")
    chat = one(found, name="chat sim-model")
    job = one(found, name="process sim-model")
    engine = one(found, name="POST", kind="client")
    # The tree: the client's span -> server -> chat -> (Redis) -> process -> engine call.
    assert server["parent_span_id"] == client_span, "the client's traceparent is honoured"
    assert chat["parent_span_id"] == server["span_id"]
    assert job["parent_span_id"] == chat["span_id"], "the job carried the context"
    assert engine["parent_span_id"] == job["span_id"]
    assert (chat["service"], job["service"], engine["service"]) == (
        "llmq-gateway", "llmq-worker", "llmq-worker"
    )  # fmt: skip
    assert job["kind"] == "consumer"
    a = chat["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "sim-model"
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.id"] == job_id
    assert a["gen_ai.usage.output_tokens"] == 16
    assert a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.response.time_to_first_chunk"] > 0
    assert a["llmq.key"] == "anonymous"
    assert a["llmq.band"] == "normal"
    assert a["llmq.queue.position"] >= 1
    assert "error.type" not in a
    assert {e["name"] for e in chat["events"]} >= {"admitted", "started"}
    w = job["attributes"]
    assert w["messaging.message.id"] == job_id
    assert w["messaging.operation.type"] == "process"
    assert w["llmq.worker"]
    assert w["llmq.queue.wait_s"] >= 0
    assert w["llmq.outcome"] == "completed"
    recorded = sim_stats(sim.url)["recorded"]["traced"]
    assert recorded["traceparent"] == f"00-{client_trace}-{engine['span_id']}-01", (
        "the engine got the engine call's context"
    )
    # The other gateway's request: a trace of its own, the same shape.
    other = second.headers["x-request-id"]
    chats: list[Span] = []

    def exported() -> bool:  # the second gateway exports on its own schedule
        chats[:] = [s for s in spans(otlp) if s["attributes"].get("gen_ai.response.id") == other]
        return bool(chats)

    wait_for(exported, 30, "the other gateway's chat span")
    assert len(chats) == 1
    assert chats[0]["trace_id"] != client_trace
    rest = trace_of(otlp, chats[0]["trace_id"], complete)
    assert one(rest, name="process sim-model")["parent_span_id"] == chats[0]["span_id"]
    assert canary not in json.dumps(spans(otlp)), "no prompt in any span"
    # The TTFT histogram's bucket names the trace (an OpenMetrics exemplar).
    openmetrics = httpx.get(
        f"http://127.0.0.1:{gws[0].metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    ).text
    buckets = [line for line in openmetrics.splitlines()
               if line.startswith("api_time_to_first_token_seconds_bucket")]  # fmt: skip
    assert any(f'trace_id="{client_trace}"' in line for line in buckets), buckets


def test_prompts_reach_a_span_only_when_trace_content_is_on(
    stack: Stack, traced: dict[str, Any], otlp: Proc
) -> None:
    stack.worker(**traced)
    quiet, telling = stack.gateway(**traced), stack.gateway(trace_content=True, **traced)
    canary = "PROMPT-" + secrets.token_hex(8)
    ask = body(stream=False)
    ask["messages"][0]["content"] = canary
    ids = []
    for gw in (quiet, telling):
        answer = httpx.post(gw.url + "/v1/chat/completions", json=ask, timeout=60)
        assert answer.status_code == 200
        ids.append(answer.headers["x-request-id"])

    def chat_span(job_id: str) -> Span | None:
        return next((s for s in spans(otlp)
                     if s["attributes"].get("gen_ai.response.id") == job_id), None)  # fmt: skip

    wait_for(lambda: all(chat_span(i) for i in ids), 30, "both chat spans")
    assert canary not in json.dumps(chat_span(ids[0]))
    told = chat_span(ids[1])
    assert told is not None
    assert canary in told["attributes"]["gen_ai.input.messages"]


def test_refusals_and_a_lost_worker_end_their_spans_with_the_error(
    stack: Stack, traced: dict[str, Any], otlp: Proc, sim: Proc
) -> None:
    worker = stack.worker(max_active=1, **traced)
    gw = stack.gateway(queue_mode="reject", **traced)
    timeouts = stack.gateway(queue_timeout_s=1, queue_predict=False, **traced)

    async def run() -> tuple[Any, Any, Any]:
        async with httpx.AsyncClient(timeout=60) as c:
            held = asyncio.create_task(stream_chat(c, gw.url, body(stream=True, hold="h")))
            await asyncio.to_thread(wait_held, sim.url, "h", 1)
            busy = await c.post(gw.url + "/v1/chat/completions", json=body(stream=False))
            late = await c.post(timeouts.url + "/v1/chat/completions", json=body(stream=False))
            worker.popen.send_signal(signal.SIGKILL)  # the held job's worker dies
            lost = await held
            return busy, late, lost

    busy, late, lost = asyncio.run(run())
    assert busy.status_code == 429
    assert late.status_code == 503
    assert lost.sse_errors
    release(sim.url, "h")

    def chat_spans() -> list[Span]:
        return [s for s in spans(otlp) if s["name"] == "chat sim-model"]

    wait_for(lambda: len(chat_spans()) >= 3, 30, "three chat spans")
    by_error = {s["attributes"].get("error.type"): s for s in chat_spans()}
    assert {"server_busy", "queue_timeout", "worker_lost"} <= set(by_error), sorted(
        str(k) for k in by_error
    )
    for code in ("server_busy", "queue_timeout", "worker_lost"):
        assert by_error[code]["status"]["code"] == 2, "ERROR"
    lost_id = by_error["worker_lost"]["attributes"]["gen_ai.response.id"]
    assert lost_id == lost.headers["x-request-id"]


def test_a_resumed_stream_links_to_the_trace_that_made_the_job(
    stack: Stack, traced: dict[str, Any], otlp: Proc
) -> None:
    stack.worker(**traced)
    gw = stack.gateway(**traced)
    made = httpx.post(gw.url + "/v1/chat/completions",
                      json={**body(stream=True), "store": True}, timeout=60)  # fmt: skip
    assert made.status_code == 200
    job_id = made.headers["x-request-id"]
    again = httpx.get(f"{gw.url}/v1/chat/completions/{job_id}", params={"stream": "true"},
                      timeout=60)  # fmt: skip
    assert again.status_code == 200
    assert "[DONE]" in again.text

    def both() -> bool:
        got = spans(otlp)
        return any(s["name"] == "resume sim-model" for s in got) and any(
            s["attributes"].get("gen_ai.response.id") == job_id and s["name"] == "chat sim-model"
            for s in got
        )

    wait_for(both, 30, "the chat span and the resume span")
    got = spans(otlp)
    origin = next(s for s in got if s["name"] == "chat sim-model")
    resume = next(s for s in got if s["name"] == "resume sim-model")
    assert resume["trace_id"] != origin["trace_id"], "the reader's own trace"
    assert resume["links"] == [{"trace_id": origin["trace_id"], "span_id": origin["span_id"]}]
    assert resume["attributes"]["gen_ai.response.id"] == job_id
