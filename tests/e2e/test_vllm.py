"""End to end against a real vLLM server with the bundled model; the client is the openai SDK."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from typing import cast

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from tests.support.clients import assert_drained, read_frames, stream_chat
from tests.support.stack import BUNDLED_MODEL as MODEL
from tests.support.stack import E2E_ENGINE_KEY as ENGINE_KEY
from tests.support.stack import E2E_MAX_MODEL_LEN as MAX_MODEL_LEN
from tests.support.stack import E2E_SECOND_NAME as SECOND
from tests.support.stack import ROOT, Proc, Stack, engine_paths, wait_for

# The first test also waits for vLLM to start (a minute or more on 2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


def running(vllm: Proc) -> float:
    text = httpx.get(vllm.url + "/metrics").text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    assert values, "vLLM exports vllm:num_requests_running"
    return sum(float(v) for v in values)


def test_models_lists_the_served_models(stack: Stack, vllm: Proc, sdk) -> None:
    """vLLM runs with an API key (as compose runs it): refused without it, so the models
    listed through the gateway prove the worker sends VLLM_API_KEY. The engine serves the
    bundled model under two names (vLLM's --served-model-name): both listed, as vLLM owns
    them, with an alias of the second."""
    assert httpx.get(vllm.url + "/v1/models").status_code == 401
    stack.worker()
    gw = stack.gateway(model_aliases=json.dumps({"gpt-4o-mini": SECOND}))
    listed = sdk(gw.url).models.list().data
    assert [m.id for m in listed] == [MODEL, SECOND, "gpt-4o-mini"]
    assert {m.owned_by for m in listed} == {"vllm"}


def test_each_served_name_is_a_model_with_its_own_queue_and_metrics(
    stack: Stack, vllm: Proc, rdb: redis.Redis, sdk
) -> None:
    """Requests for the second served name (and its alias) run on the real engine; the
    gateway counts them under that model, its bound under its own key."""
    stack.worker()
    gw = stack.gateway(model_aliases=json.dumps({"gpt-4o-mini": SECOND}))
    client = sdk(gw.url)
    for model in (SECOND, "gpt-4o-mini", MODEL):
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
        assert out.choices[0].message.content
        assert out.usage is not None
        assert out.usage.completion_tokens >= 1
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
    assert f'api_admissions_total{{model="{SECOND}"}} 2.0' in text
    assert f'api_admissions_total{{model="{MODEL}"}} 1.0' in text
    assert f'api_capacity_slots{{model="{SECOND}"}}' in text
    assert_drained(rdb)
    assert rdb.zrange("llmq:models", 0, -1) == sorted([MODEL.encode(), SECOND.encode()])


def test_usage_through_the_gateway_equals_vllm_direct(stack: Stack, vllm: Proc, sdk) -> None:
    stack.worker()
    gw = stack.gateway()
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    direct = sdk(vllm.url, ENGINE_KEY).chat.completions.create(**ask)
    via = sdk(gw.url).chat.completions.create(**ask)
    assert via.usage == direct.usage
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert "Paris" in (via.choices[0].message.content or "")

    chunks = list(
        sdk(gw.url).chat.completions.create(
            **ask, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == direct.choices[0].message.content
    assert chunks[-1].usage == direct.usage
    assert chunks[-1].model_extra["timings"]["completion_tokens"] == direct.usage.completion_tokens


def test_a_busy_worker_gets_several_tokens_per_delta_from_vllm(
    stack: Stack, vllm: Proc, sdk
) -> None:
    """vLLM honours the per-request stream_interval a busy worker sends (here busy from its
    first job, and a frame long enough for many tokens): the first stream teaches the
    worker the engine's time per token, the next one arrives in fewer deltas, with the
    first token alone first, and the same greedy text and usage."""
    stack.worker(stream_batch_from=1, stream_frame_ms=1000)
    gw = stack.gateway()
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0}

    def deltas() -> tuple[list[str], object]:
        chunks = list(
            sdk(gw.url).chat.completions.create(
                **ask,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},  # all 24 tokens: a short answer would not do
            )
        )
        texts = [
            c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
        ]
        return texts, chunks[-1].usage

    per_token, usage = deltas()
    batched, batched_usage = deltas()
    assert "".join(batched) == "".join(per_token)
    assert batched_usage == usage
    assert len(per_token) >= 12, per_token  # (a token may bring no text: EOS, merges)
    assert len(batched) < len(per_token) / 2, (per_token, batched)


def test_a_resumed_stored_stream_equals_the_direct_greedy_answer(
    stack: Stack, vllm: Proc, sdk
) -> None:
    """store: true on the real engine: drop the stream after three deltas, resume it on a
    second gateway after the last event seen; the two parts make vLLM's own answer, and
    the SDK retrieves the stored completion."""
    stack.worker()
    gw1, gw2 = stack.gateway(), stack.gateway()
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    direct = sdk(vllm.url, ENGINE_KEY).chat.completions.create(**ask)

    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(timeout=120) as c:
            url = gw1.url + "/v1/chat/completions"
            first = await read_frames(
                c, "POST", url, json={**ask, "stream": True, "store": True}, max_chunks=3
            )
            job_id = first.chunks[0]["id"]
            rest = await read_frames(
                c,
                "GET",
                f"{gw2.url}/v1/chat/completions/{job_id}",
                params={"stream": "true", "starting_after": first.last_id},
            )
            assert rest.done
            assert first.ids + rest.ids == sorted(set(first.ids + rest.ids))
            return job_id, first.text + rest.text

    job_id, text = asyncio.run(run())
    assert text == direct.choices[0].message.content
    kept = sdk(gw2.url).chat.completions.retrieve(job_id)
    assert kept.choices[0].message.content == direct.choices[0].message.content
    assert kept.usage == direct.usage


def test_a_ten_line_batch_completes_with_the_bundled_model(stack: Stack, vllm: Proc, sdk) -> None:
    stack.worker(batch_feed_s=0.2)
    gw = stack.gateway()
    client = sdk(gw.url)
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": ask}
        for i in range(10)
    ]
    raw = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    uploaded = client.files.create(file=("ten.jsonl", raw), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(
        lambda: client.batches.retrieve(batch.id).status == "completed", 600, "the batch to end"
    )
    done = client.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (10, 0)
    assert done.output_file_id is not None
    rows = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    direct = sdk(vllm.url, ENGINE_KEY).chat.completions.create(**ask)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"q{i}" for i in range(10))
    for r in rows:
        assert r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens


def test_client_disconnect_mid_stream_aborts_inside_vllm(stack: Stack, vllm: Proc, sdk) -> None:
    stack.worker()
    gw = stack.gateway()
    stream = sdk(gw.url).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    assert running(vllm) == 1
    stream.close()
    t0 = time.monotonic()
    wait_for(lambda: running(vllm) == 0, 3, "vllm:num_requests_running to fall back to 0")
    print(f"vLLM stopped generating {time.monotonic() - t0:.2f}s after the client left")


def test_over_long_prompt_returns_vllm_400_in_openai_shape(
    stack: Stack, rdb: redis.Redis, sdk
) -> None:
    stack.worker()
    gw = stack.gateway()
    long = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 100)}]
    for stream in (False, True):
        # With stream=True the SDK raises at create() only because the gateway held the
        # status until the engine answered; a 200 + error event would not raise here.
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gw.url).chat.completions.create(model=MODEL, messages=long, stream=stream)
        err = info.value.body
        assert isinstance(err, dict)
        assert set(err) >= {"message", "type", "param", "code"}
        assert str(MAX_MODEL_LEN) in err["message"]
    assert_drained(rdb)


def test_requests_beyond_max_active_wait_in_the_queue_and_all_complete(
    stack: Stack, rdb: redis.Redis
) -> None:
    stack.worker(max_active=2)
    gw = stack.gateway()
    peak = 0

    async def run() -> list[openai.types.chat.ChatCompletion]:
        nonlocal peak
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            tasks = [
                asyncio.create_task(
                    client.chat.completions.create(
                        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0
                    )
                )
                for _ in range(5)
            ]
            while not all(t.done() for t in tasks):
                queued = cast(int, rdb.zcard("llmq:queue"))
                peak = max(peak, queued - len(cast(list[bytes], rdb.keys("arq:in-progress:*"))))
                await asyncio.sleep(0.02)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert len(results) == 5
    assert all(r.usage is not None and r.usage.completion_tokens > 0 for r in results)
    assert peak >= 1, "with 2 slots and 5 requests some must have waited in the queue"
    assert_drained(rdb)


def test_model_preparation_is_idempotent_and_verifies(vllm: Proc) -> None:
    python, model = engine_paths()
    t0 = time.monotonic()
    proc = subprocess.run(
        [python, "-m", "local.prepare_model", "--out", model, "--verify"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "already prepared" in proc.stderr
    assert "verified: LlamaForCausalLM" in proc.stderr
    print(f"re-run with verification took {time.monotonic() - t0:.1f}s")


def _readme_curl_body() -> dict[str, object]:
    """The JSON body of the README's first curl sample, as a reader would paste it."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        r"curl -N http://127\.0\.0\.1:8080/v1/chat/completions.*?-d '(.*?)'", readme, re.S
    )
    assert match, "the README has a curl sample"
    body: dict[str, object] = json.loads(match.group(1))
    return body


async def test_readme_sample_answers_paris(stack: Stack) -> None:
    """The first impression: the README's sample, default sampling, through the gateway."""
    stack.worker()
    gw = stack.gateway()
    payload = _readme_curl_body()
    assert payload["model"] == MODEL
    assert "temperature" not in payload, "the sample relies on the model's default sampling"
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(3):
            result = await stream_chat(client, gw.url, payload)
            assert result.status == 200
            assert result.done
            assert "Paris" in result.text, result.text


def test_the_readme_responses_sample_answers_paris(stack: Stack, vllm: Proc, sdk) -> None:
    """The README's Responses API sample on the real engine, as the SDK sends it: the
    answer, streamed and not, names Paris; the events come in OpenAI's order."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"curl -s http://127\.0\.0\.1:8080/v1/responses.*?-d '(.*?)'", readme, re.S)
    assert match, "the README has a Responses curl sample"
    payload = json.loads(match.group(1))
    assert payload["model"] == MODEL
    stack.worker()
    client = sdk(stack.gateway().url)
    done = client.responses.create(**payload)
    assert done.status == "completed"
    assert "Paris" in done.output_text, done.output_text
    events = list(client.responses.create(**payload, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "Paris" in events[-1].response.output_text
