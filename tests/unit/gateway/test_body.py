"""Hostile bodies at the edge: each a 400 naming the problem, none a 500."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError

from llmq.gateway.body import (
    MAX_JSON_DEPTH,
    check_max_tokens,
    check_stored_size,
    parse_chat_body,
)
from llmq.shared.errors import InvalidRequest
from llmq.shared.settings import Settings

SETTINGS = Settings(max_messages=100, max_prompt_chars=1000)


def ok_body(**extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def parse(obj: object) -> object:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_chat_body(raw, SETTINGS)


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_a_plain_request_passes_with_its_unknown_fields() -> None:
    req = parse(ok_body(top_k=5))
    assert req.model_extra == {"top_k": 5}  # type: ignore[attr-defined]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 300, 100_000])
def test_deep_nesting_anywhere_is_a_400(depth: int) -> None:
    raw = (
        json.dumps(ok_body(extra=nested(depth))).encode()
        if depth < 1000
        else (b'{"model":"m","messages":[],"x":' + b"[" * depth + b"]" * depth + b"}")
    )
    with pytest.raises(InvalidRequest, match=r"nested deeper|JSON objects/arrays"):
        parse_chat_body(raw, SETTINGS)


def test_a_lone_surrogate_is_a_400_naming_the_field() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'
    with pytest.raises(InvalidRequest) as info:
        parse_chat_body(raw, SETTINGS)
    assert info.value.param == "messages.0.content"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}] * 101}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "x" * 1001}]}, "messages"),
    ],
)
def test_caps_on_messages_and_prompt_size(body: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.param == param


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'"x"', b"\xff\xfe", b""])
def test_not_a_json_object_is_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_chat_body(raw, SETTINGS)


def test_schema_errors_keep_fastapis_shape() -> None:
    with pytest.raises(RequestValidationError) as info:
        parse({"model": "m", "messages": [{"role": "wizard"}]})
    assert info.value.errors()[0]["loc"] == ("messages", 0, "role")


def test_a_body_of_many_messages_is_refused_before_it_is_parsed() -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": "user"}] * 101}).encode()
    with pytest.raises(InvalidRequest, match="more than 100 messages"):
        parse_chat_body(raw, SETTINGS)
    # "role" inside a string is escaped, so it does not count as a message.
    text = json.dumps('{"role": "x"} ' * 200)
    raw = b'{"model":"m","messages":[{"role":"user","content":' + text.encode() + b"}]}"
    assert parse_chat_body(raw, Settings(max_messages=100)).messages[0].content


def test_too_many_objects_or_arrays_are_refused_before_parsing() -> None:
    raw = json.dumps(ok_body(x=[[]] * 200)).encode()
    with pytest.raises(InvalidRequest, match="JSON objects/arrays"):
        parse_chat_body(raw, Settings(max_json_containers=100))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"kv_transfer_params": {}}, "kv_transfer_params"),
        ({"request_id": "x"}, "request_id"),
        ({"chat_template": "{{ x }}"}, "chat_template"),
        ({"priority": -100}, "priority"),
        ({"guided_regex": "(a+)+$"}, "guided_regex"),
        ({"n": 16}, "n"),
        ({"logprobs": True, "top_logprobs": 1_000_000}, "top_logprobs"),
    ],
)
def test_fields_beyond_one_request_or_unbounded_are_400(
    extra: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(ok_body(**extra))
    assert info.value.param == param


def test_allowed_fields_pass_and_media_needs_a_setting() -> None:
    assert parse(ok_body(top_k=5, seed=1, stop=["x"], logprobs=True, top_logprobs=5))
    image = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}],
            }
        ],
    }
    with pytest.raises(InvalidRequest) as info:
        parse(image)
    assert info.value.param == "messages.0.content"
    assert parse_chat_body(json.dumps(image).encode(), Settings(allow_media=True))


def test_max_tokens_are_capped_by_the_engine_context() -> None:
    req = parse(ok_body(max_tokens=10**12))
    with pytest.raises(InvalidRequest) as info:
        check_max_tokens(req, 2048)  # type: ignore[arg-type]
    assert info.value.param == "max_tokens"
    check_max_tokens(parse(ok_body(max_tokens=100)), 2048)  # type: ignore[arg-type]
    check_max_tokens(req, 0)  # type: ignore[arg-type]  # no cap known: the engine decides


def test_a_stored_completion_is_bounded_by_store_max_tokens() -> None:
    req = parse_chat_body(json.dumps(ok_body(store=True)).encode(), SETTINGS)
    check_stored_size(req, 0)  # no cap of its own: the engine's context bounds it
    with pytest.raises(InvalidRequest) as no_max:
        check_stored_size(req, 100)
    assert no_max.value.param == "max_tokens"
    check_stored_size(parse_chat_body(json.dumps(ok_body(max_tokens=100)).encode(), SETTINGS), 100)
    over = parse_chat_body(json.dumps(ok_body(max_completion_tokens=101)).encode(), SETTINGS)
    with pytest.raises(InvalidRequest) as too_many:
        check_stored_size(over, 100)
    assert too_many.value.param == "max_completion_tokens"
