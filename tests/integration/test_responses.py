"""The Responses API through the official ``openai`` SDK, on real processes (redis-server,
gateways, a worker, the engine simulator): plain and streamed answers with OpenAI's event
order and sequence numbers, function tools (namespaced too) and built-in ones left out,
``previous_response_id`` over a tool loop, stored responses and their items, background
responses polled, cancelled and resumed from another gateway, refusals."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.support.clients import (
    MODEL,
    assert_drained,
    new_key,
    release,
    sim_stats,
    wait_held,
)
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def client(sdk: Callable[[str, str], openai.OpenAI]) -> Callable[..., Any]:
    """The SDK's client for a gateway (closed after the test), typed loosely: the tests
    send what Codex and others send (tools and items as plain dicts) and read the answers'
    fields directly."""

    def make(gw: Proc, secret: str = "unused") -> Any:
        return sdk(gw.url, secret)

    return make


def sim(**knobs: Any) -> dict[str, Any]:
    return {"sim": knobs}


def test_plain_and_streamed_answers_in_openais_shape(
    stack: Stack, rdb: redis.Redis, client: Any
) -> None:
    stack.worker()
    c = client(stack.gateway())
    done = c.responses.create(
        model=MODEL, input="Say three words.", instructions="Be brief.", store=False,
        extra_body=sim(tokens=3),
    )  # fmt: skip
    assert done.id.startswith("resp_")
    assert done.status == "completed"
    assert done.output_text == "tok0 tok1 tok2 "
    assert done.usage is not None
    assert done.usage.output_tokens == 3
    assert done.usage.total_tokens == done.usage.input_tokens + 3
    assert done.instructions == "Be brief."

    events = list(
        c.responses.create(model=MODEL, input="Again.", stream=True, extra_body=sim(tokens=3))
    )
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == "tok0 tok1 tok2 "
    assert final.status == "completed"
    assert final.usage.output_tokens == 3
    item_ids = {getattr(e, "item_id", None) for e in events} - {None}
    assert item_ids == {final.output[0].id}
    assert_drained(rdb)


def test_max_output_tokens_makes_it_incomplete(stack: Stack, client: Any) -> None:
    stack.worker()
    c = client(stack.gateway())
    events = list(c.responses.create(model=MODEL, input="Talk.", max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    response = events[-1].response
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "tok0 tok1 "


def test_unknown_fields_are_refused_and_clients_fields_accepted(stack: Stack, client: Any) -> None:
    stack.worker()
    c = client(stack.gateway())
    with pytest.raises(openai.BadRequestError) as refused:
        c.responses.create(model=MODEL, input="x", extra_body={"frobnicate": 1})
    assert refused.value.code == "unknown_parameter"
    assert refused.value.param == "frobnicate"
    small = client(stack.gateway(max_prompt_chars=40))
    with pytest.raises(openai.BadRequestError) as too_long:
        small.responses.create(model=MODEL, input="x" * 50, store=False)
    assert too_long.value.param == "input"
    # What Codex CLI and the Agents SDK send besides: accepted, meaningless here.
    done = c.responses.create(
        model=MODEL, input="x", store=False, include=["reasoning.encrypted_content"],
        reasoning={"effort": "low"}, prompt_cache_key="conv-1", safety_identifier="u1",
        extra_body={"client_metadata": {"a": "b"}, **sim(tokens=1)},
    )  # fmt: skip
    assert done.status == "completed"


def test_built_in_tools_are_left_out_and_named(stack: Stack, client: Any) -> None:
    stack.worker()
    gw = stack.gateway()
    raw = client(gw).responses.with_raw_response.create(
        model=MODEL, input="x", store=False,
        tools=[{"type": "web_search"}, WEATHER], extra_body=sim(tokens=1, record="b"),
    )  # fmt: skip
    assert raw.headers["x-llmq-omitted-tools"] == "web_search"
    assert raw.parse().status == "completed"
    sent = sim_stats(stack.engine_url)["recorded"]["b"]["tools"]
    assert [t["function"]["name"] for t in sent] == ["get_weather"]

    strict = client(stack.gateway(responses_builtin_tools="reject"))
    with pytest.raises(openai.BadRequestError) as refused:
        strict.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert refused.value.param == "tools.0.type"


def test_a_namespaced_tool_is_called_by_its_own_name(stack: Stack, client: Any) -> None:
    stack.worker()
    c = client(stack.gateway())
    lookup = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    crm = {"type": "namespace", "name": "crm", "description": "CRM tools", "tools": [lookup]}
    done = c.responses.create(
        model=MODEL, input="find Ann", tools=[crm],
        extra_body=sim(tool_call={"name": "crm__lookup", "arguments": '{"q": "Ann"}'},
                       record="ns"),
    )  # fmt: skip
    [call] = done.output
    assert call.type == "function_call"
    assert (call.name, call.arguments) == ("lookup", '{"q": "Ann"}')
    namespace = getattr(call, "namespace", None) or (call.model_extra or {}).get("namespace")
    assert namespace == "crm"
    sent = sim_stats(stack.engine_url)["recorded"]["ns"]["tools"]
    assert sent[0]["function"]["name"] == "crm__lookup"


def test_a_tool_loop_over_three_turns_with_previous_response_id(stack: Stack, client: Any) -> None:
    """Turn 1 calls the tool; turn 2 sends its output after turn 1; turn 3 follows up. The
    engine gets every earlier item each time: the user's words, the call, its output."""
    stack.worker()
    c = client(stack.gateway())
    args = '{"city": "Paris"}'
    first = c.responses.create(
        model=MODEL, input="Weather in Paris?", instructions="Use tools.", tools=[WEATHER],
        extra_body=sim(tool_call={"name": "get_weather", "arguments": args}),
    )  # fmt: skip
    [call] = first.output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", args)
    second = c.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        extra_body=sim(tokens=2, record="t2"),
    )  # fmt: skip
    assert second.output_text == "tok0 tok1 "
    third = c.responses.create(
        model=MODEL, previous_response_id=second.id, input="Thanks!",
        extra_body=sim(tokens=1, record="t3"),
    )  # fmt: skip
    recorded = sim_stats(stack.engine_url)["recorded"]
    t2, t3 = recorded["t2"]["messages"], recorded["t3"]["messages"]
    assert [m["role"] for m in t2] == ["user", "assistant", "tool"]  # instructions: per turn
    assert t2[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": args}
    assert t2[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    assert t3[:3] == t2
    assert t3[3:] == [
        {"role": "assistant", "content": "tok0 tok1 "},
        {"role": "user", "content": "Thanks!"},
    ]
    assert third.previous_response_id == second.id

    with pytest.raises(openai.NotFoundError) as missing:
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_" + "0" * 48)
    assert missing.value.code == "previous_response_not_found"


def test_stored_responses_are_the_keys_own(stack: Stack, rdb: redis.Redis, client: Any) -> None:
    stack.worker()
    gw = stack.gateway(auth="keys")
    mine, theirs = client(gw, new_key(stack, "owner")), client(gw, new_key(stack, "other"))
    done = mine.responses.create(
        model=MODEL, input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        metadata={"team": "a"}, extra_body=sim(tokens=2),
    )  # fmt: skip
    again = mine.responses.retrieve(done.id)
    assert (again.status, again.output_text, again.metadata) == ("completed", "tok0 tok1 ",
                                                                 {"team": "a"})  # fmt: skip

    def texts(page: Any) -> list[str]:
        return [item.content[0].text for item in page]

    assert texts(mine.responses.input_items.list(done.id, order="asc")) == ["one", "two"]
    assert texts(mine.responses.input_items.list(done.id)) == ["two", "one"]
    for call in (
        lambda: theirs.responses.retrieve(done.id),
        lambda: theirs.responses.input_items.list(done.id),
        lambda: theirs.responses.delete(done.id),
        lambda: theirs.responses.create(model=MODEL, input="x", previous_response_id=done.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    mine.responses.delete(done.id)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(done.id)
    # A chat completion's routes do not see responses, nor its list.
    assert [c.id for c in mine.chat.completions.list()] == []
    assert_drained(rdb)


def poll(c: Any, response_id: str, statuses: set[str]) -> Any:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found["r"] = c.responses.retrieve(response_id)
        return found["r"].status in statuses

    wait_for(reached, 30, f"{response_id} reaching {statuses}")
    return found["r"]


def test_background_is_queued_then_polled_from_another_gateway(stack: Stack, client: Any) -> None:
    stack.worker(max_active=1)
    one, two = client(stack.gateway()), client(stack.gateway())
    busy = one.responses.create(
        model=MODEL, input="first", background=True, extra_body=sim(tokens=1, hold="bg")
    )
    wait_held(stack.engine_url, "bg", 1)
    waiting = one.responses.create(
        model=MODEL, input="second", background=True, extra_body=sim(tokens=2)
    )
    assert waiting.status == "queued"
    assert (waiting.model_extra or {}).get("queue_position") == 1
    assert two.responses.retrieve(waiting.id).status == "queued"
    release(stack.engine_url, "bg")
    assert poll(two, busy.id, {"completed"}).output_text == "tok0 "
    assert poll(two, waiting.id, {"completed"}).output_text == "tok0 tok1 "


def test_cancel_a_queued_and_a_running_background_response(stack: Stack, client: Any) -> None:
    stack.worker(max_active=1)
    c = client(stack.gateway())
    running = c.responses.create(
        model=MODEL, input="a", background=True, extra_body=sim(tokens=4, hold="run")
    )
    wait_held(stack.engine_url, "run", 1)
    queued = c.responses.create(model=MODEL, input="b", background=True)
    assert c.responses.cancel(queued.id).status == "cancelled"
    assert c.responses.retrieve(queued.id).status == "cancelled"
    abandoned = sim_stats(stack.engine_url)["streams_abandoned"]
    assert c.responses.cancel(running.id).status == "cancelled"
    wait_for(
        lambda: sim_stats(stack.engine_url)["streams_abandoned"] == abandoned + 1,
        30, "the engine's request dropped",
    )  # fmt: skip
    assert poll(c, running.id, {"cancelled"}).status == "cancelled"


def _stream_lines(url: str, response_id: str, after: int) -> list[dict[str, Any]]:
    """``GET /v1/responses/{id}?stream=true&starting_after=`` read to its end."""
    events = []
    with httpx.stream(
        "GET", f"{url}/v1/responses/{response_id}",
        params={"stream": "true", "starting_after": after}, timeout=60,
    ) as r:  # fmt: skip
        r.raise_for_status()
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == kind
                events.append(event)
    return events


def test_a_background_stream_resumes_on_another_gateway_after_its_own_died(
    stack: Stack, client: Any
) -> None:
    stack.worker()
    first_gw, second_gw = stack.gateway(), stack.gateway()
    c = client(first_gw)
    seen = []
    with c.responses.create(
        model=MODEL, input="long", background=True, stream=True,
        extra_body=sim(tokens=4, hold="resume", hold_after=2),
    ) as events:  # fmt: skip
        for event in events:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) >= 6:
                break
    response_id = seen[0].response.id
    assert seen[0].response.status == "queued"
    first_gw.kill()
    release(stack.engine_url, "resume")
    rest = _stream_lines(second_gw.url, response_id, seen[-1].sequence_number)
    numbers = [e["sequence_number"] for e in rest]
    assert numbers == list(range(seen[-1].sequence_number + 1, numbers[-1] + 1))
    assert rest[-1]["type"] == "response.completed"
    text = "".join(getattr(e, "delta", "") for e in seen if e.type == "response.output_text.delta")
    text += "".join(e["delta"] for e in rest if e["type"] == "response.output_text.delta")
    assert text == rest[-1]["response"]["output"][0]["content"][0]["text"] == "tok0 tok1 tok2 tok3 "
    # From the start, finished: the same events, the same numbers.
    whole = _stream_lines(second_gw.url, response_id, 0)
    assert whole[-len(rest) :] == rest


def test_a_full_queue_is_a_429_before_anything_runs(
    stack: Stack, rdb: redis.Redis, client: Any
) -> None:
    stack.worker(max_active=1)
    c = client(stack.gateway(queue_mode="reject"))
    c.responses.create(model=MODEL, input="a", background=True, extra_body=sim(hold="full"))
    wait_held(stack.engine_url, "full", 1)
    with pytest.raises(openai.RateLimitError) as refused:
        c.responses.create(model=MODEL, input="b", store=False)
    assert refused.value.code == "server_busy"
    assert refused.value.response.headers.get("retry-after")
    release(stack.engine_url, "full")
    assert_drained(rdb)


def test_a_client_leaving_a_foreground_response_cancels_it(stack: Stack, client: Any) -> None:
    """Not streamed, stored (the default), not background: the client hangs up while the
    engine is at work; the engine's request is dropped and the response is cancelled."""
    stack.worker()
    gw = stack.gateway()
    body = json.dumps({"model": MODEL, "input": "x", "sim": {"tokens": 8, "hold": "leave"}})
    host, port = gw.url.removeprefix("http://").split(":")
    abandoned = sim_stats(stack.engine_url)["streams_abandoned"]
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            f"POST /v1/responses HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        wait_held(stack.engine_url, "leave", 1)
    wait_for(
        lambda: sim_stats(stack.engine_url)["streams_abandoned"] == abandoned + 1,
        30, "the engine's request dropped",
    )  # fmt: skip
    c = client(gw)
    [stored] = _stored_ids(stack)
    assert poll(c, stored, {"cancelled"}).status == "cancelled"


def _stored_ids(stack: Stack) -> list[str]:
    rdb = redis.Redis.from_url(stack.redis_url)
    try:
        return [k.decode().removeprefix("llmq:stored:") for k in rdb.scan_iter("llmq:stored:*")]
    finally:
        rdb.close()


def test_a_waiting_stream_hears_its_place_in_the_queue(stack: Stack, client: Any) -> None:
    """``X-Queue-Updates: true``: ``response.created`` at admission, then ``: queued
    position=1`` while the only slot is busy; once the slot frees, the rest of the stream,
    numbered on from the created event."""
    stack.worker(max_active=1)
    gw = stack.gateway()
    c = client(gw)
    c.responses.create(model=MODEL, input="a", background=True, extra_body=sim(hold="busy"))
    wait_held(stack.engine_url, "busy", 1)
    lines: list[str] = []
    body = {"model": MODEL, "input": "b", "stream": True, "store": False, "sim": {"tokens": 2}}
    with httpx.stream(
        "POST", gw.url + "/v1/responses", json=body, headers={"X-Queue-Updates": "true"},
        timeout=60,
    ) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith(": queued position=1"):
                release(stack.engine_url, "busy")
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
    assert lines[0] == "event: response.created"
    assert lines.index(next(x for x in lines if x.startswith(": queued"))) > lines.index(
        "event: response.created"
    )
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "tok0 tok1 "
