"""The embeddings and legacy completions requests (``shared.embeddings``,
``shared.completions``): OpenAI's shapes and limits, the job, the answer's wire format."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from pydantic import ValidationError

from llmq.shared import completions, embeddings
from llmq.shared.embeddings import EmbeddingRequest, split_tokens
from llmq.shared.protocol import Api, ModelKind


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("one", ["one"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
        ([0], [[0]]),
    ],
)
def test_the_four_input_shapes_become_one_list(given: object, inputs: list[object]) -> None:
    assert EmbeddingRequest(model="m", input=given).inputs() == inputs


@pytest.mark.parametrize(
    "given",
    ["", [], ["a", ""], ["a", 1], [[1], "a"], [[]], [-1], [[1, -2]], [True], None, {"a": 1},
     ["x"] * 2049, [[1]] * 2049],
)  # fmt: skip
def test_empty_mixed_negative_or_too_many_inputs_are_refused(given: object) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest(model="m", input=given)


def test_2048_inputs_and_a_long_token_id_input_are_accepted() -> None:
    assert len(EmbeddingRequest(model="m", input=["x"] * 2048).inputs()) == 2048
    assert len(EmbeddingRequest(model="m", input=list(range(5000))).inputs()) == 1


def test_encoding_format_and_dimensions_are_checked() -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest(model="m", input="a", encoding_format="int8")
    with pytest.raises(ValidationError):
        EmbeddingRequest(model="m", input="a", dimensions=0)


def test_the_job_is_never_streamed_and_counts_its_tokens() -> None:
    req = EmbeddingRequest(model="m", input=["abcdefgh", "x"], encoding_format="base64")
    spec = embeddings.to_job_spec(req, "embd-1", tpm=100)
    assert spec.api is Api.EMBEDDINGS
    assert not spec.stream
    assert spec.body == {"model": "m", "input": ["abcdefgh", "x"], "encoding_format": "base64"}
    assert spec.token_estimate == 2 + 1
    assert embeddings.estimate_tokens([[1, 2, 3]]) == 3


def test_the_answer_carries_floats_or_base64_in_input_order_usage_first() -> None:
    floats = [0.5, -0.25, 1.0]
    b64 = base64.b64encode(struct.pack("<3f", *floats)).decode()
    as_floats = embeddings.encode(embeddings.answer("m", [b64, b64], 7, "float"))
    out = json.loads(as_floats)
    assert out["object"] == "list"
    assert out["model"] == "m"
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][0] == {"object": "embedding", "index": 0, "embedding": floats}
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert embeddings.usage_of(as_floats) == {"prompt_tokens": 7, "total_tokens": 7}
    as_b64 = json.loads(embeddings.encode(embeddings.answer("m", [b64], 1, "base64")))
    assert as_b64["data"][0]["embedding"] == b64
    assert embeddings.usage_of(b'{"data":[]}') == {}


@pytest.mark.parametrize(
    ("total", "weights", "parts"),
    [(10, [1, 1], [5, 5]), (10, [1, 2], [3, 7]), (7, [1, 1, 1], [3, 2, 2]), (0, [3, 1], [0, 0]),
     (5, [0, 0], [3, 2]), (9, [5], [9])],
)  # fmt: skip
def test_a_shared_count_splits_exactly(total: int, weights: list[int], parts: list[int]) -> None:
    assert split_tokens(total, weights) == parts
    assert sum(split_tokens(total, weights)) == total


def test_a_model_kind_serves_its_own_endpoints_only() -> None:
    assert ModelKind.EMBED.serves(Api.EMBEDDINGS)
    assert not any(ModelKind.EMBED.serves(a) for a in (Api.CHAT, Api.RESPONSES, Api.COMPLETIONS))
    assert not ModelKind.GENERATE.serves(Api.EMBEDDINGS)
    message = ModelKind.EMBED.refusal("mini", Api.CHAT)
    assert "`mini` is an embedding model" in message
    assert "/v1/chat/completions" in message


def test_a_completion_job_streams_with_usage_and_estimates_its_default_max_tokens() -> None:
    req = completions.CompletionRequest(model="m", prompt=["abcd", "efgh"], stream=True, n=2)
    spec = completions.to_job_spec(req, "cmpl-1", tpm=10)
    assert spec.api is Api.COMPLETIONS
    assert spec.stream
    assert not spec.include_usage
    assert spec.body["stream_options"] == {"include_usage": True}
    assert spec.token_estimate == 8 // 4 + completions.DEFAULT_MAX_TOKENS * 2 * 2
    with pytest.raises(ValidationError):
        completions.CompletionRequest(model="m", prompt=[])
    assert completions.CompletionRequest(model="m", prompt=[1, 2]).prompts() == 1
