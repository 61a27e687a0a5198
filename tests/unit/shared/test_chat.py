from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmq.shared.chat import ChatCompletionRequest, new_job_id, to_job_spec

MSG = [{"role": "user", "content": "hi"}]


def test_streaming_job_always_asks_engine_for_usage() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "stream": True})
    spec = to_job_spec(req, "chatcmpl-1")
    assert spec.body["stream_options"] == {"include_usage": True}
    assert spec.include_usage is False


def test_client_include_usage_is_remembered() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert to_job_spec(req, "x").include_usage is True


def test_unknown_fields_are_passed_through() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "top_k": 5, "guided_json": {"type": "object"}}
    )
    body = to_job_spec(req, "x").body
    assert body["top_k"] == 5
    assert body["guided_json"] == {"type": "object"}
    assert body["stream"] is False
    assert "stream_options" not in body


@pytest.mark.parametrize(
    "bad",
    [
        {"messages": MSG},
        {"model": "m", "messages": []},
        {"model": "m", "messages": MSG, "max_tokens": 0},
        {"model": "m", "messages": MSG, "temperature": 5},
    ],
)
def test_invalid_requests_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(bad)


def test_job_ids_are_openai_style_and_unique() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("chatcmpl-") for i in ids)
