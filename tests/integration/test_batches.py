"""The Batch API with the official openai SDK, on real Redis, processes and the simulator."""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.support.clients import MODEL, release, sim_stats, wait_held
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration

FAST = {"batch_feed_s": 0.1}


def line(custom_id: str, tokens: int = 3, **sim: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"request {custom_id}"}],
            "sim": {"tokens": tokens, "tag": custom_id, **sim},
        },
    }


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def submit(client: openai.OpenAI, items: list[dict[str, Any]]) -> Any:
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(items))), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )


def wait_status(
    client: openai.OpenAI, batch_id: str, statuses: set[str], within: float = 60
) -> Any:
    wait_for(
        lambda: client.batches.retrieve(batch_id).status in statuses,
        within,
        f"batch {batch_id} to be {statuses}",
    )
    return client.batches.retrieve(batch_id)


def results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    return {r["custom_id"]: r for r in rows}


def test_a_batch_runs_every_line_once_with_exact_usage(stack: Stack, sim: Proc, sdk) -> None:
    stack.worker(max_active=2, **FAST)
    gw = stack.gateway()
    client = sdk(gw.url)
    items = [line(f"req-{i}", tokens=i + 1) for i in range(12)]
    batch = submit(client, items)
    assert batch.status == "in_progress"
    assert batch.request_counts.total == 12
    done = wait_status(client, batch.id, {"completed"})
    assert done.request_counts.completed == 12
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    assert done.metadata == {"run": "test"}
    out = results(client, done.output_file_id)
    assert sorted(out) == sorted(i["custom_id"] for i in items)
    for i in range(12):
        row = out[f"req-{i}"]
        assert row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["usage"]["completion_tokens"] == i + 1
        assert body["choices"][0]["message"]["content"] == "".join(f"tok{t} " for t in range(i + 1))
    assert Counter(sim_stats(sim.url)["tags"]) == Counter(i["custom_id"] for i in items)
    assert [b.id for b in client.batches.list(limit=5).data] == [batch.id]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_invalid_jsonl_is_a_400_naming_the_line(stack: Stack, sdk) -> None:
    stack.worker()
    gw = stack.gateway()
    client = sdk(gw.url)
    good = jsonl([line("a"), line("b")])
    for bad, words in (
        (good + b"{not json\n", "line 3"),
        (jsonl([line("a"), line("a")]), "line 2: custom_id 'a' appears twice"),
        (jsonl([line("a"), {**line("b"), "url": "/v1/audio/speech"}]), "line 2: url"),
        (jsonl([line("a"), {**line("b"), "url": "/v1/embeddings"}]), "line 2: body.input"),
        (jsonl([{**line("a"), "body": {"model": MODEL, "messages": []}}]), "line 1: body.messages"),
        (jsonl([{**line("a"), "body": {**line("a")["body"], "stream": True}}]), "line 1"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.files.create(file=("in.jsonl", io.BytesIO(bad)), purpose="batch")
        assert words in str(err.value.body), err.value.body
    missing = httpx.post(
        gw.url + "/v1/batches",
        json={
            "input_file_id": "file-none",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert missing.status_code == 404


def test_cancel_mid_batch_keeps_partial_output(
    stack: Stack, rdb: redis.Redis, sim: Proc, sdk
) -> None:
    stack.worker(max_active=1, **FAST)
    gw = stack.gateway(batch_max_inflight=2)
    client = sdk(gw.url)
    items = [line("first", hold="batch-first")] + [line(f"rest-{i}") for i in range(6)]
    batch = submit(client, items)
    wait_held(sim.url, "batch-first", 1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    release(sim.url, "batch-first")
    done = wait_status(client, batch.id, {"cancelled"})
    assert set(results(client, done.output_file_id)) == {"first"}
    assert done.request_counts.completed == 1
    assert sim_stats(sim.url)["tags"] == ["first"]  # the queued one was taken back
    wait_for(lambda: rdb.zcard("llmq:queue") == 0, 10, "the batch's queued job to be gone")


def test_killed_gateway_and_worker_mid_batch(stack: Stack, sim: Proc, sdk) -> None:
    victim = stack.worker(max_active=1, **FAST)
    gw1, gw2 = stack.gateway(), stack.gateway()
    items = [line("held", hold="victim-held")] + [line(f"n-{i}") for i in range(9)]
    batch = submit(sdk(gw1.url), items)
    wait_held(sim.url, "victim-held", 1)
    gw1.kill()
    victim.popen.send_signal(signal.SIGKILL)
    stack.worker(max_active=2, **FAST)
    client = sdk(gw2.url)
    done = wait_status(client, batch.id, {"completed"}, within=90)
    assert done.request_counts.completed + done.request_counts.failed == 10
    errors = results(client, done.error_file_id)
    assert list(errors) == ["held"]
    assert errors["held"]["error"]["code"] == "worker_lost"
    assert set(results(client, done.output_file_id)) == {f"n-{i}" for i in range(9)}
    tags = Counter(sim_stats(sim.url)["tags"])
    assert max(tags.values()) == 1, tags  # no request ran twice


def test_interactive_request_waits_at_most_one_turnover(stack: Stack, sim: Proc, sdk) -> None:
    """Every slot runs batch work (a 200-request batch): an interactive request takes the
    next free slot. Its queue wait is reported and asserted against a generous bound."""
    stack.worker(max_active=2, **FAST)
    gw = stack.gateway(batch_max_inflight=8)
    client = sdk(gw.url)
    batch = submit(client, [line(f"b-{i}", tokens=20, itl_ms=10) for i in range(200)])
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4, 30, "warm")
    waits = []
    for _ in range(3):
        answer = httpx.post(
            gw.url + "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "sim": {"tokens": 2},
            },
            timeout=30,
        ).json()
        waits.append(answer["timings"]["queue_wait_ms"])
    turnover_ms = 20 * 10 + 10  # one batch job: 20 tokens at 10 ms, plus its TTFT
    print(f"interactive queue waits behind a full batch: {waits} ms (one job: ~{turnover_ms} ms)")
    assert max(waits) < 5 * turnover_ms + 1000  # generous for a loaded 2-core machine
    client.batches.cancel(batch.id)
    wait_status(client, batch.id, {"cancelled"})


def test_a_batch_past_its_window_expires_with_batch_expired_errors(
    stack: Stack, rdb: redis.Redis, sim: Proc, sdk
) -> None:
    stack.worker(max_active=1, **FAST)
    gw = stack.gateway(batch_max_inflight=1)
    client = sdk(gw.url)
    items = [line("first", hold="batch-expiry")] + [line(f"late-{i}") for i in range(5)]
    batch = submit(client, items)
    wait_held(sim.url, "batch-expiry", 1)
    rdb.hset(f"llmq:batch:{batch.id}", "expires_at", str(int(time.time()) - 1))  # window ends
    release(sim.url, "batch-expiry")
    done = wait_status(client, batch.id, {"expired"})
    assert done.expired_at is not None
    assert set(results(client, done.output_file_id)) == {"first"}
    errors = results(client, done.error_file_id)
    assert sorted(errors) == [f"late-{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 5)
    assert sim_stats(sim.url)["tags"] == ["first"]


def test_responses_lines_answer_as_the_responses_api(stack: Stack, sim: Proc, sdk) -> None:
    """``/v1/responses`` lines (a batch of them, endpoint ``/v1/responses``): each result's
    body is a ``response`` object, instructions and tools echoed, a tool call as its item;
    a line that would need state (``previous_response_id``) is refused at upload."""
    stack.worker(**FAST)
    client = sdk(stack.gateway().url)
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    items = [
        {"custom_id": "text", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": "hi", "instructions": "Be brief.",
                  "sim": {"tokens": 2}}},
        {"custom_id": "call", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": "weather?", "tools": [weather, {"type": "web_search"}],
                  "sim": {"tool_call": {"name": "get_weather", "arguments": "{}"}}}},
    ]  # fmt: skip
    uploaded = client.files.create(file=("r.jsonl", io.BytesIO(jsonl(items))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h"
    )
    done = wait_status(client, batch.id, {"completed"})
    assert done.request_counts.completed == 2
    out = results(client, done.output_file_id)
    text = out["text"]["response"]["body"]
    assert text["object"] == "response"
    assert text["status"] == "completed"
    assert text["instructions"] == "Be brief."
    assert text["output"][0]["content"][0]["text"] == "tok0 tok1 "
    assert text["usage"]["output_tokens"] == 2
    [call] = out["call"]["response"]["body"]["output"]
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "get_weather", "{}")

    first: dict[str, Any] = items[0]
    stateful = [{**first, "body": {**first["body"], "previous_response_id": "resp_x"}}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("s.jsonl", io.BytesIO(jsonl(stateful))), purpose="batch")
    assert "line 1: previous_response_id is not served in a batch" in refused.value.message
