"""The Responses API's request conversion and its event builder (pure logic, no Redis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from llmq.shared.errors import InvalidRequest, JobCancelled, UnknownParameter, WorkerLost
from llmq.shared.protocol import Event, EventType
from llmq.shared.responses.events import ResponseBuilder, from_completion, replay
from llmq.shared.responses.request import (
    ECHO_KEY,
    ToolNames,
    batch_body,
    chat_tools,
    echo,
    items_json,
    parse_items,
    parse_request,
    to_chat,
)

RID = "resp_" + "ab" * 24


def chunk(seq: int, **delta: Any) -> Event:
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return Event(seq, EventType.CHUNK, json.dumps(body).encode())


def done(seq: int, finish: str = "stop", **usage: int) -> Event:
    final = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    data = {"final": final, "usage": usage or {"prompt_tokens": 5, "completion_tokens": 2}}
    return Event(seq, EventType.DONE, json.dumps(data).encode())


def builder(**echoed: Any) -> ResponseBuilder:
    return ResponseBuilder(RID, "m", 1, {"background": False, **echoed})


def test_an_unknown_field_is_named_and_a_clients_extras_accepted() -> None:
    with pytest.raises(UnknownParameter) as refused:
        parse_request({"model": "m", "input": "x", "frobnicate": 1})
    assert refused.value.param == "frobnicate"
    assert refused.value.code == "unknown_parameter"
    req = parse_request(
        {"model": "m", "input": "x", "include": ["reasoning.encrypted_content"],
         "reasoning": {"effort": "low"}, "prompt_cache_key": "k", "client_metadata": {},
         "store": False, "sim": {"tokens": 1}},
        engine_extra=frozenset({"sim"}),
    )  # fmt: skip
    assert req.engine_extra == {"sim": {"tokens": 1}}
    chat, _, _ = to_chat(req, [])
    assert (chat.model_extra or {})["sim"] == {"tokens": 1}
    with pytest.raises(ValidationError):
        parse_request({"model": "m", "input": [{"type": "image_generation_call"}]})


def test_items_become_chat_messages_in_order() -> None:
    req = parse_request(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": [{"type": "input_text", "text": "hi "},
                                             {"type": "input_text", "text": "there"}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "calling"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}",
                 "namespace": "ns"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
            ],
            "max_output_tokens": 7,
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"},
                                "strict": True}},
        }
    )  # fmt: skip
    chat, _, _ = to_chat(req, [])
    body = chat.model_dump(exclude_unset=True)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "ns__g", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]  # fmt: skip
    assert body["max_tokens"] == 7
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": True},
    }
    # Stored and read back, items are the same items.
    assert items_json(parse_items(items_json(req.items()))) == items_json(req.items())


def test_tools_namespaced_flattened_built_ins_left_out_or_refused() -> None:
    tools: list[dict[str, Any]] = [
        {"type": "web_search"},
        {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False},
        {"type": "namespace", "name": "crm", "description": "d",
         "tools": [{"type": "function", "name": "lookup", "description": "find"}]},
    ]  # fmt: skip
    names = ToolNames()
    out, omitted = chat_tools(tools, names, reject_builtin=False)
    assert [t["function"]["name"] for t in out] == ["f", "crm__lookup"]
    assert out[0]["function"] == {"name": "f", "parameters": {"type": "object"}, "strict": False}
    assert omitted == ["web_search"]
    assert names.client_name("crm__lookup") == ("lookup", "crm")
    assert names.client_name("f") == ("f", None)
    with pytest.raises(InvalidRequest) as refused:
        chat_tools(tools, ToolNames(), reject_builtin=True)
    assert refused.value.param == "tools.0.type"
    req = parse_request(
        {"model": "m", "input": "x", "tools": tools[1:],
         "tool_choice": {"type": "function", "name": "lookup", "namespace": "crm"}}
    )  # fmt: skip
    chat, _, _ = to_chat(req, [])
    extra = chat.model_extra or {}
    assert extra["tool_choice"] == {"type": "function", "function": {"name": "crm__lookup"}}


def test_text_streams_in_openais_order_and_numbers() -> None:
    b = builder()
    events = replay(
        b,
        [
            Event(1, EventType.STARTED, b"w"),
            chunk(2, role="assistant", content=""),
            chunk(3, content="Hel"),
            chunk(4, content="lo"),
            done(5),
        ],
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(10))
    final = b.response()
    assert final["status"] == "completed"
    assert final["output"] == [
        {"type": "message", "id": f"msg_{RID[5:]}_0", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]}
    ]  # fmt: skip
    assert final["usage"]["input_tokens"] == 5
    assert final["usage"]["output_tokens"] == 2
    assert final["usage"]["total_tokens"] == 7
    assert events[0].frame().startswith(b"event: response.created\ndata: {")


def test_the_same_job_events_make_the_same_stream_anywhere() -> None:
    log = [chunk(2, content="a"), chunk(3, content="b"), done(4)]
    one, two = replay(builder(), log), replay(builder(), log)
    assert [e.model_dump() for e in one] == [e.model_dump() for e in two]


def test_a_function_call_streams_its_arguments_and_keeps_its_client_name() -> None:
    names = ToolNames()
    names.engine_name("lookup", "crm")
    b = ResponseBuilder(RID, "m", 1, {"background": False}, names)
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "crm__lookup", "arguments": ""}}  # fmt: skip
    events = replay(
        b,
        [
            chunk(2, content="Let me look."),
            chunk(3, tool_calls=[call]),
            chunk(4, tool_calls=[{"index": 0, "function": {"arguments": '{"q":'}}]),
            chunk(5, tool_calls=[{"index": 0, "function": {"arguments": ' "Ann"}'}}]),
            done(6, finish="tool_calls"),
        ],
    )
    kinds = [e.type for e in events]
    assert kinds[-6:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_item.added", 3)
    [message, function] = b.response()["output"]
    assert message["content"][0]["text"] == "Let me look."
    assert function == {
        "type": "function_call", "id": f"fc_{RID[5:]}_1", "call_id": "call_1", "name": "lookup",
        "arguments": '{"q": "Ann"}', "status": "completed", "namespace": "crm",
    }  # fmt: skip


def test_max_output_tokens_and_failures_end_it_as_openai_does() -> None:
    b = builder()
    events = replay(b, [chunk(2, content="a"), done(3, finish="length")])
    assert events[-1].type == "response.incomplete"
    assert b.response()["incomplete_details"] == {"reason": "max_output_tokens"}

    b = builder()
    lost = WorkerLost("the worker running this job stopped")
    error = Event(0, EventType.ERROR, json.dumps(lost.to_wire()).encode())
    events = replay(b, [chunk(2, content="a"), error])
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert b.response()["status"] == "failed"
    assert b.response()["error"] == {"code": "worker_lost", "message": lost.message}

    b = builder(background=True)
    assert b.start()[0].model_dump()["response"]["status"] == "queued"
    cancelled = b.feed(Event(0, EventType.ERROR, json.dumps(JobCancelled("x").to_wire()).encode()))
    assert [e.type for e in cancelled] == ["error", "response.failed"]
    assert b.response()["status"] == "cancelled"


def test_the_response_repeats_the_requests_fields() -> None:
    req = parse_request({"model": "m", "input": "x", "temperature": 0.5, "metadata": {"a": "b"}})
    fields = echo(req)
    assert fields["temperature"] == 0.5
    assert fields["metadata"] == {"a": "b"}
    assert fields["store"] is True
    assert fields["tool_choice"] == "auto"
    assert fields["text"] == {"format": {"type": "text"}}


def test_a_batch_line_runs_as_a_chat_body_and_answers_as_a_response() -> None:
    body = batch_body(
        {"model": "m", "input": "x", "instructions": "Be brief.", "tools": [
            {"type": "namespace", "name": "crm", "description": "d",
             "tools": [{"type": "function", "name": "lookup"}]}]},
    )  # fmt: skip
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body[ECHO_KEY]["instructions"] == "Be brief."
    with pytest.raises(InvalidRequest) as refused:
        batch_body({"model": "m", "input": "x", "previous_response_id": "resp_1"})
    assert refused.value.param == "body.previous_response_id"
    completion = {
        "model": "m",
        "created": 7,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "crm__lookup", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }  # fmt: skip
    response = from_completion(RID, completion, body[ECHO_KEY])
    assert response["status"] == "completed"
    assert response["created_at"] == 7
    [call] = response["output"]
    assert (call["name"], call["namespace"], call["call_id"]) == ("lookup", "crm", "call_1")
    assert response["usage"]["total_tokens"] == 4
