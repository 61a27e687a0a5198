"""Embeddings and legacy completions against the real vLLM CPU build: all-MiniLM-L6-v2 (the
local run's embedding model, from its PyPI package) on its own vLLM with the pooling
runner and its own worker, beside the session's chat engine, as ``scripts/run.sh`` runs
them. Real vectors: a paraphrase is closer than an unrelated sentence."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from langchain_openai import OpenAIEmbeddings

from tests.e2e.conftest import ENGINE_KEY, serving
from tests.support.clients import assert_drained
from tests.support.stack import (
    BUNDLED_MODEL,
    EMBED_MODEL,
    Proc,
    Stack,
    embed_model_dir,
    spawn_vllm_embedding,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # the engines start within a test
DIM = 384  # all-MiniLM-L6-v2's vectors


@pytest.fixture(scope="module")
def vllm_embed(logdir: Path) -> Iterator[Proc]:
    if not (embed_model_dir() / "config.json").exists():
        pytest.fail(f"no embedding model in {embed_model_dir()}: run `bash scripts/test.sh`",
                    pytrace=False)  # fmt: skip
    proc = spawn_vllm_embedding(logdir, max_num_seqs=16, api_key=ENGINE_KEY)
    yield serving(proc, "the embedding model")
    proc.stop(timeout=20)


@pytest.fixture
def gateway(stack: Stack, vllm_embed: Proc) -> Proc:
    stack.worker()  # the chat model's
    stack.worker(vllm_url=vllm_embed.url, max_active=16)
    gw = stack.gateway()

    def both_known() -> bool:
        r = httpx.post(gw.url + "/v1/embeddings", json={"model": BUNDLED_MODEL, "input": "x"})
        models = {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
        return r.status_code == 400 and EMBED_MODEL in models  # each kind probed

    wait_for(both_known, 120, "the gateway to know both models' kinds")
    return gw


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_real_embeddings_through_the_queue(gateway: Proc, sdk: Any, rdb: redis.Redis) -> None:
    client: openai.OpenAI = sdk(gateway.url)
    cat, rug, money = (
        "The cat sits on the mat.",
        "A cat is sitting on a rug.",
        "Quarterly revenue rose by eight percent.",
    )
    got = client.embeddings.create(model=EMBED_MODEL, input=[cat, rug, money])
    vectors = [d.embedding for d in got.data]
    assert [len(v) for v in vectors] == [DIM] * 3
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors), "unit length"
    near, far = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert near > far + 0.3, (near, far)
    assert got.usage.prompt_tokens > 3 * 3

    texts = [f"document number {i} about a topic" for i in range(100)]
    many = client.embeddings.create(model=EMBED_MODEL, input=texts, encoding_format="float")
    assert [d.index for d in many.data] == list(range(100))
    alone = client.embeddings.create(model=EMBED_MODEL, input=texts[42], encoding_format="float")
    assert cosine(many.data[42].embedding, alone.data[0].embedding) > 0.9999

    ids = client.embeddings.create(model=EMBED_MODEL, input=[101, 7592, 2088, 102],
                                   encoding_format="float")  # fmt: skip
    assert len(ids.data[0].embedding) == DIM
    assert ids.usage.prompt_tokens == 4
    url = gateway.url + "/v1/embeddings"
    as_b64 = httpx.post(url, json={"model": EMBED_MODEL, "input": cat, "encoding_format": "base64"})
    raw = base64.b64decode(as_b64.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{DIM}f", raw)) == vectors[0]

    for body, param in (
        ({"model": EMBED_MODEL, "input": cat, "dimensions": 128}, "dimensions"),
        ({"model": BUNDLED_MODEL, "input": cat}, "model"),
    ):
        refused = httpx.post(url, json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param
    hi = [{"role": "user", "content": "hi"}]
    chat = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": EMBED_MODEL, "messages": hi}
    )
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "model_not_supported"
    too_long = httpx.post(url, json={"model": EMBED_MODEL, "input": ["fine", "word " * 600]})
    assert too_long.status_code == 400, "the engine's refusal, with its own message"
    assert "maximum context length" in too_long.json()["error"]["message"]
    emb = OpenAIEmbeddings(model=EMBED_MODEL, base_url=gateway.url + "/v1", api_key="unused",
                           check_embedding_ctx_length=False, max_retries=0)  # type: ignore[call-arg]  # fmt: skip
    assert cosine(emb.embed_query(cat), vectors[0]) > 0.9999
    assert_drained(rdb)


def test_real_legacy_completions_plain_and_streamed(
    gateway: Proc, sdk: Any, rdb: redis.Redis
) -> None:
    client: openai.OpenAI = sdk(gateway.url)
    plain = client.completions.create(
        model=BUNDLED_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert plain.object == "text_completion"
    assert plain.choices[0].text.strip()
    assert plain.usage is not None
    assert plain.usage.completion_tokens == 8 or plain.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(
        model=BUNDLED_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text, "greedy: the same words streamed or not"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    echo = client.completions.create(
        model=BUNDLED_MODEL, prompt="Paris is", max_tokens=2, temperature=0, echo=True
    )
    assert echo.choices[0].text.startswith("Paris is"), "echo reaches vLLM"
    assert_drained(rdb)
