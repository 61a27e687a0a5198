"""Embeddings and legacy completions on real Redis and processes: a fleet of a chat engine
and two embedding engines from the simulator (``--embed-dim``; one takes ``dimensions``), a
worker each, one gateway. The official SDK, LangChain's ``OpenAIEmbeddings`` and the Vercel
AI SDK's ``embedMany`` as their users call them; the wrong kind of model refused before
anything is queued; a mixed burst on one fleet; batch lines of both endpoints."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import secrets
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from langchain_openai import OpenAIEmbeddings

from bench.engine_sim import sim_vector
from tests.support.clients import assert_drained, everything, new_key, sim_stats, stream_chat
from tests.support.stack import ROOT, Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.integration

CHAT, MINI, MATRYOSHKA = "smol", "mini", "nomic"
DIM, MATRYOSHKA_DIM = 384, 256


@pytest.fixture(scope="module")
def sims(logdir: Path) -> Iterator[tuple[Proc, Proc, Proc]]:
    chat = start_sim(logdir, "--model", CHAT, "--ttft-ms", "5", "--itl-ms", "2", "--tokens", "8")
    mini = start_sim(logdir, "--model", MINI, "--embed-dim", str(DIM))
    nomic = start_sim(logdir, "--model", MATRYOSHKA, "--embed-dim", str(MATRYOSHKA_DIM),
                      "--matryoshka")  # fmt: skip
    yield chat, mini, nomic
    for s in (chat, mini, nomic):
        s.kill()


@pytest.fixture
def fleet(stack: Stack, sims: tuple[Proc, Proc, Proc]) -> tuple[Proc, Proc, Proc, Proc]:
    """(gateway, chat engine, embedding engine, Matryoshka engine), every kind known."""
    chat, mini, nomic = sims
    for s in sims:
        httpx.post(s.url + "/sim/reset").raise_for_status()
    stack.worker(vllm_url=chat.url, max_active=16)
    stack.worker(vllm_url=mini.url, max_active=32)
    stack.worker(vllm_url=nomic.url, max_active=8)
    gw = stack.gateway(queue_max=512)  # room for the burst test's 250 at once

    def kinds_known() -> bool:
        health = httpx.get(gw.url + "/health").json()
        if set(health["models"]) != {CHAT, MINI, MATRYOSHKA}:
            return False
        probe = httpx.post(gw.url + "/v1/embeddings", json={"model": CHAT, "input": "x"})
        return probe.status_code == 400  # the chat model's kind is in its heartbeat
        # (this refusal is itself before the queue: nothing reaches an engine)

    wait_for(kinds_known, 30, "the gateway to know every model's kind")
    for s in sims:  # the probes above and the workers' own are not counted as requests
        httpx.post(s.url + "/sim/reset").raise_for_status()
    return gw, chat, mini, nomic


def unpack(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_the_sdk_embeds_strings_token_ids_and_base64_in_input_order(
    fleet: tuple[Proc, Proc, Proc, Proc], sdk: Any, rdb: redis.Redis
) -> None:
    gw, _, mini, _ = fleet
    client: openai.OpenAI = sdk(gw.url)
    one = client.embeddings.create(model=MINI, input="hello world", encoding_format="float")
    assert one.object == "list"
    assert one.model == MINI
    assert one.data[0].embedding == pytest.approx(sim_vector("hello world", DIM), abs=0)
    assert one.usage.prompt_tokens == one.usage.total_tokens == 4  # the engine's own count

    texts = [f"sentence {i} of a hundred" for i in range(100)]
    many = client.embeddings.create(model=MINI, input=texts)  # the SDK asks for base64
    assert [d.index for d in many.data] == list(range(100))
    assert [d.embedding for d in many.data] == [sim_vector(t, DIM) for t in texts]
    assert many.usage.prompt_tokens == 100 * (5 + 2)  # the simulator: words + 2

    ids = client.embeddings.create(model=MINI, input=[101, 7592, 102], encoding_format="float")
    assert ids.data[0].embedding == sim_vector([101, 7592, 102], DIM)
    assert ids.usage.prompt_tokens == 3
    lists = client.embeddings.create(model=MINI, input=[[1, 2], [3]], encoding_format="float")
    assert [d.embedding for d in lists.data] == [sim_vector([1, 2], DIM), sim_vector([3], DIM)]

    pair = {"model": MINI, "input": ["a b", "c"]}
    raw = httpx.post(gw.url + "/v1/embeddings", json={**pair, "encoding_format": "base64"})
    floats = httpx.post(gw.url + "/v1/embeddings", json=pair)
    assert raw.status_code == floats.status_code == 200
    assert [unpack(d["embedding"]) for d in raw.json()["data"]] == [
        d["embedding"] for d in floats.json()["data"]
    ]
    assert raw.headers["x-request-id"].startswith("embd-")
    stats = sim_stats(mini.url)
    assert stats["embed_inputs"] == 1 + 100 + 1 + 2 + 2 + 2, "each input reached it once"
    assert stats["by_model"] == {MINI: stats["embed_requests"]}
    assert_drained(rdb)


def test_dimensions_where_the_model_takes_them_and_a_400_where_not(
    fleet: tuple[Proc, Proc, Proc, Proc], sdk: Any
) -> None:
    gw, _, mini, nomic = fleet
    client: openai.OpenAI = sdk(gw.url)
    short = client.embeddings.create(model=MATRYOSHKA, input="abc", dimensions=64)
    assert short.data[0].embedding == sim_vector("abc", 64)
    refusals = [(MINI, 64, "does not take `dimensions`"),
                (MATRYOSHKA, MATRYOSHKA_DIM + 1, f"at most {MATRYOSHKA_DIM}")]  # fmt: skip
    for model, dims, says in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=model, input="abc", dimensions=dims)
        assert refused.value.status_code == 400
        assert says in refused.value.message
        assert refused.value.body["param"] == "dimensions"  # type: ignore[index]
    assert sim_stats(mini.url)["requests"] == 0
    assert sim_stats(nomic.url)["embed_requests"] == 1


def test_the_wrong_kind_of_model_is_a_400_before_anything_is_queued(
    fleet: tuple[Proc, Proc, Proc, Proc], rdb: redis.Redis
) -> None:
    gw, chat, mini, _ = fleet
    chat_body = {"model": MINI, "messages": [{"role": "user", "content": "hi"}]}
    asks = [
        ("/v1/chat/completions", chat_body, "`mini` is an embedding model"),
        ("/v1/chat/completions", {**chat_body, "stream": True}, "embedding model"),
        ("/v1/completions", {"model": MINI, "prompt": "hi"}, "/v1/completions cannot use it"),
        ("/v1/responses", {"model": MINI, "input": "hi"}, "/v1/responses cannot use it"),
        ("/v1/embeddings", {"model": CHAT, "input": "hi"}, "`smol` is a generative model"),
    ]
    for path, body, says in asks:
        r = httpx.post(gw.url + path, json=body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "model_not_supported"
        assert err["param"] == "model"
        assert says in err["message"]
    bad_inputs = ["", [], ["a", ""], ["a", 1], ["x"] * 2049, None]
    for bad in bad_inputs:
        r = httpx.post(gw.url + "/v1/embeddings", json={"model": MINI, "input": bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "input"
    r = httpx.post(gw.url + "/v1/embeddings",
                   json={"model": MINI, "input": "a", "encoding_format": "int8"})  # fmt: skip
    assert r.status_code == 400
    r = httpx.post(gw.url + "/v1/embeddings", json={"model": MINI, "input": "a", "seed": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "seed"
    assert sim_stats(chat.url)["requests"] == sim_stats(mini.url)["requests"] == 0
    assert rdb.zcard("llmq:queue") == 0
    assert not list(rdb.scan_iter("arq:job:*"))
    metrics = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
    assert "api_admissions_total{" not in metrics, "nothing was admitted"


def test_200_embeddings_and_50_chat_streams_on_one_fleet_each_reach_their_own_engine(
    fleet: tuple[Proc, Proc, Proc, Proc], rdb: redis.Redis
) -> None:
    gw, chat, mini, nomic = fleet

    async def burst() -> tuple[list[httpx.Response], list[Any]]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            url = gw.url + "/v1/embeddings"
            embeds = [c.post(url, json={"model": MINI, "input": f"text {i}"}) for i in range(200)]
            streams = [
                stream_chat(c, gw.url, {"model": CHAT, "stream": True,
                                        "messages": [{"role": "user", "content": f"q{i}"}]})
                for i in range(50)
            ]  # fmt: skip
            got: list[Any] = await asyncio.gather(*embeds, *streams)
            return got[:200], got[200:]

    embeds, streams = asyncio.run(burst())
    assert [r.status_code for r in embeds] == [200] * 200
    for i, r in enumerate(embeds):
        assert r.json()["data"][0]["embedding"] == sim_vector(f"text {i}", DIM)
    assert [s.status for s in streams] == [200] * 50
    assert all(s.text == "".join(f"tok{i} " for i in range(8)) for s in streams)
    sc, sm, sn = sim_stats(chat.url), sim_stats(mini.url), sim_stats(nomic.url)
    assert sc["by_model"] == {CHAT: 50}
    assert sc["embed_requests"] == 0
    assert sm["embed_inputs"] == 200
    assert set(sm["by_model"]) == {MINI}
    assert sm["not_found"] == sc["not_found"] == 0
    assert sn["requests"] == 0
    worker_jobs = sm["embed_requests"]
    print(f"200 embedding jobs reached the engine in {worker_jobs} requests "
          f"(the largest held {sm['embed_largest']})")  # fmt: skip
    assert_drained(rdb)


def test_langchain_embeds_documents_and_a_query(fleet: tuple[Proc, Proc, Proc, Proc]) -> None:
    gw, _, mini, _ = fleet
    # As LangChain documents it for an OpenAI-compatible server: its own tokenizer
    # (tiktoken, OpenAI's vocabulary) is off, the texts go as they are.
    emb = OpenAIEmbeddings(model=MINI, base_url=gw.url + "/v1", api_key="unused",
                           check_embedding_ctx_length=False, max_retries=0)  # type: ignore[call-arg]  # fmt: skip
    docs = ["The cat sits on the mat.", "Revenue rose by eight percent."]
    assert emb.embed_documents(docs) == [sim_vector(d, DIM) for d in docs]
    assert emb.embed_query("Where is the cat?") == sim_vector("Where is the cat?", DIM)
    assert sim_stats(mini.url)["embed_inputs"] == 3


def test_the_ai_sdk_embeds_many_values(
    fleet: tuple[Proc, Proc, Proc, Proc], tmp_path: Path
) -> None:
    gw, _, _, _ = fleet
    folder = os.environ.get("LLMQ_NODE_CLIENTS")
    assert folder, "LLMQ_NODE_CLIENTS is not set: run the tests with scripts/test.sh"
    script = Path(folder) / "ai_sdk_embed_test.mjs"  # beside its node_modules (ESM lookup)
    shutil.copy(ROOT / "tests/support/ai_sdk_embed.mjs", script)
    values = ["sunny day at the beach", "rainy night in the city", "a third value"]
    done = subprocess.run(
        ["node", str(script)],
        env={**os.environ, "GATEWAY_URL": gw.url, "MODEL": MINI, "VALUES": json.dumps(values)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["embeddings"] == [sim_vector(v, DIM) for v in values]
    assert out["usage"]["tokens"] == sum(len(v.split()) + 2 for v in values)


def test_legacy_completions_plain_and_streamed(
    fleet: tuple[Proc, Proc, Proc, Proc], sdk: Any, rdb: redis.Redis
) -> None:
    gw, chat, _, _ = fleet
    client: openai.OpenAI = sdk(gw.url)
    text = "".join(f"tok{i} " for i in range(3))
    plain = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=3)
    assert plain.object == "text_completion"
    assert plain.id.startswith("cmpl-")
    assert plain.choices[0].text == text
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None
    assert plain.usage.completion_tokens == 3
    chunks = list(client.completions.create(
        model=CHAT, prompt=[1, 2, 3], max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert {c.object for c in chunks} == {"text_completion"}
    assert {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    with httpx.stream("POST", gw.url + "/v1/completions",
                      json={"model": CHAT, "prompt": "x", "stream": True}) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert sim_stats(chat.url)["by_model"] == {CHAT: 3}
    refused = httpx.post(gw.url + "/v1/completions", json={"model": CHAT, "prompt": "x", "n": 9})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "n"
    assert_drained(rdb)


def _batch(client: openai.OpenAI, lines: list[dict[str, Any]]) -> Any:
    data = "\n".join(json.dumps(line) for line in lines).encode()
    upload = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"the batch is still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    return batch


def test_a_batch_of_embedding_and_completion_lines_completes(
    fleet: tuple[Proc, Proc, Proc, Proc], sdk: Any
) -> None:
    gw, _, _, _ = fleet
    client: openai.OpenAI = sdk(gw.url)
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MINI, "input": [f"line {i}", "same"]}}
        for i in range(20)
    ] + [
        {"custom_id": "c0", "method": "POST", "url": "/v1/completions",
         "body": {"model": CHAT, "prompt": "Once", "max_tokens": 2}},
        {"custom_id": "wrong", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": CHAT, "input": "x"}},
    ]  # fmt: skip
    batch = _batch(client, lines)
    assert batch.status == "completed"
    assert batch.request_counts.completed == 21
    assert batch.request_counts.failed == 1
    text = client.files.content(batch.output_file_id).text
    text += client.files.content(batch.error_file_id).text  # the refused line's
    out = {line["custom_id"]: line["response"] for line in map(json.loads, text.splitlines())}
    for i in range(20):
        body = out[f"e{i}"]["body"]
        assert [d["embedding"] for d in body["data"]] == [
            sim_vector(f"line {i}", DIM), sim_vector("same", DIM)
        ]  # fmt: skip
    assert out["c0"]["body"]["choices"][0]["text"] == "tok0 tok1 "
    assert out["wrong"]["status_code"] == 400
    assert "generative model" in out["wrong"]["body"]["error"]["message"]


def test_no_input_or_text_is_left_in_redis_or_the_logs(
    stack: Stack, sims: tuple[Proc, Proc, Proc], rdb: redis.Redis
) -> None:
    """Embedding inputs and legacy prompts as chat's: at LOG_LEVEL=DEBUG, in clear in Redis
    (PAYLOAD_KEYS=none) while they wait, gone once they ended."""
    chat, mini, _ = sims
    quiet: dict[str, object] = {"log_level": "DEBUG", "payload_keys": "none"}
    procs = [stack.worker(vllm_url=chat.url, **quiet), stack.worker(vllm_url=mini.url, **quiet)]
    gw = stack.gateway(log_level="DEBUG", payload_keys="none")
    procs.append(gw)
    wait_for(lambda: set(httpx.get(gw.url + "/health").json()["models"]) >= {CHAT, MINI}, 30,
             "both models")  # fmt: skip
    canary = "INPUT-" + secrets.token_hex(8)
    said = "SAID" + secrets.token_hex(8)
    emb = httpx.post(gw.url + "/v1/embeddings", json={"model": MINI, "input": [canary, "x"]})
    assert emb.status_code == 200, emb.text
    text = httpx.post(gw.url + "/v1/completions",
                      json={"model": CHAT, "prompt": canary, "sim": {"say": said}})  # fmt: skip
    assert said in text.json()["choices"][0]["text"]
    with httpx.stream("POST", gw.url + "/v1/completions",
                      json={"model": CHAT, "prompt": canary, "stream": True,
                            "sim": {"say": said}}) as r:  # fmt: skip
        assert r.status_code == 200
        assert said in r.read().decode()
    assert_drained(rdb)
    wait_for(lambda: not rdb.keys("arq:in-progress:*"), 15, "arq to finish every job")
    for word in (canary, said):
        assert [k for k, v in everything(rdb).items() if word.encode() in k + v] == []
        for proc in procs:
            assert word not in proc.output(), proc.name


def test_a_keys_tokens_per_minute_count_embedding_inputs(
    stack: Stack, sims: tuple[Proc, Proc, Proc], rdb: redis.Redis
) -> None:
    """An input of ~50 estimated tokens (200 characters) fits a key's tpm of 60 once; the
    engine's exact count (42) corrects the bucket; the second is refused."""
    _, mini, _ = sims
    httpx.post(mini.url + "/sim/reset").raise_for_status()
    stack.worker(vllm_url=mini.url)
    gw = stack.gateway(auth="keys")
    secret = new_key(stack, "indexer", "--tpm", "60")
    auth = {"Authorization": f"Bearer {secret}"}
    wait_for(lambda: MINI in httpx.get(gw.url + "/health").json()["models"], 30, "the model")
    body = {"model": MINI, "input": "word " * 40}
    first = httpx.post(gw.url + "/v1/embeddings", json=body, headers=auth)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["prompt_tokens"] == 42
    assert first.headers["x-ratelimit-limit-tokens"] == "60"
    second = httpx.post(gw.url + "/v1/embeddings", json=body, headers=auth)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(second.headers["retry-after"]) >= 1
    assert sim_stats(mini.url)["embed_requests"] == 1
    assert_drained(rdb)
