"""A migrated job's progress read back from its log, and the engine request that continues
it (worker.continuation)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmq.shared.protocol import OUT_OF_BAND, Api, Event, EventType, JobSpec
from llmq.worker.continuation import (
    NotContinuable,
    continuing,
    exact_usage,
    limited,
    progress_of,
    without_role,
)


def spec(api: Api = Api.CHAT, **body: Any) -> JobSpec:
    base: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    if api is Api.COMPLETIONS:
        base = {"model": "m", "prompt": "Once upon", "stream": True}
    return JobSpec(
        id="j", model="m", stream=True, include_usage=True, enqueued_at_ms=0, api=api,
        body={**base, **body},
    )  # fmt: skip


def chunk(seq: int, **delta: Any) -> Event:
    data = {"id": "j", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return Event(seq, EventType.CHUNK, json.dumps(data).encode())


def text_chunk(seq: int, text: str) -> Event:
    """A legacy completion's chunk."""
    return Event(
        seq, EventType.CHUNK, json.dumps({"choices": [{"index": 0, "text": text}]}).encode()
    )


def log(*parts: str) -> list[Event]:
    events = [Event(1, EventType.STARTED, b"w1")]
    for i, text in enumerate(parts):
        delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
        events.append(chunk(i + 2, **delta))
    return events


def test_progress_is_the_text_sent_and_the_last_event() -> None:
    p = progress_of(log("Hello", " world", "!"), Api.CHAT)
    assert (p.seq, p.text, p.chunks, p.chunked, p.ended) == (4, "Hello world!", 3, True, False)
    assert p.started


def test_a_job_that_sent_only_started_or_a_bare_role_runs_again_from_the_start() -> None:
    assert continuing(spec(), progress_of(log(), Api.CHAT)) is None
    role_only = progress_of(log(""), Api.CHAT)
    assert role_only.chunked
    assert not role_only.started
    assert continuing(spec(), role_only) is None


def test_a_chat_answer_goes_on_as_a_final_assistant_message() -> None:
    s = spec(max_tokens=40, tools=[{"type": "function", "function": {"name": "f"}}])
    cont = continuing(s, progress_of(log("The planets", " are"), Api.CHAT))
    assert cont is not None
    assert cont.body["messages"][-1] == {"role": "assistant", "content": "The planets are"}
    assert cont.body["continue_final_message"] is True
    assert cont.body["add_generation_prompt"] is False
    assert cont.prompt == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": s.body["tools"],
        "add_generation_prompt": True,
    }
    assert cont.extended["messages"] == cont.body["messages"]
    assert cont.extended["continue_final_message"] is True
    assert (cont.limit_key, cont.limit) == ("max_tokens", 40)
    assert limited(cont, 12) == {**cont.body, "max_tokens": 28}
    assert limited(cont, 40) is None, "nothing left to make"
    assert s.body["messages"] == [{"role": "user", "content": "hi"}], "the job is unchanged"


def test_without_a_limit_the_body_keeps_none_and_max_completion_tokens_wins() -> None:
    cont = continuing(spec(), progress_of(log("a"), Api.CHAT))
    assert cont is not None
    assert limited(cont, 5) is cont.body
    both = continuing(spec(max_tokens=9, max_completion_tokens=30), progress_of(log("a"), Api.CHAT))
    assert both is not None
    assert (both.limit_key, both.limit) == ("max_completion_tokens", 30)


def test_a_completion_goes_on_with_the_text_appended_to_its_prompt() -> None:
    events = [
        Event(1, EventType.STARTED, b"w"),
        text_chunk(2, " a time"),
    ]
    cont = continuing(spec(Api.COMPLETIONS), progress_of(events, Api.COMPLETIONS))
    assert cont is not None
    assert cont.body["prompt"] == "Once upon a time"
    assert cont.prompt == {"model": "m", "prompt": "Once upon"}
    assert cont.extended == {"model": "m", "prompt": "Once upon a time"}
    assert (cont.limit_key, cont.limit) == ("max_tokens", 16), "vLLM's default for completions"


@pytest.mark.parametrize(
    ("job", "events", "why"),
    [
        (spec(), [*log("x"), chunk(3, tool_calls=[{"index": 0, "function": {}}])], "tool call"),
        (spec(), [*log("x"), chunk(3, reasoning_content="hmm")], "reasoning"),
        (spec(n=2), log("x"), "several choices"),
        (spec(response_format={"type": "json_schema"}), log("{"), "structured output"),
        (spec(guided_json={"type": "object"}), log("{"), "structured output"),
        (spec(Api.COMPLETIONS, prompt=[1, 2, 3]), [text_chunk(2, "x")], "token ids"),
        (spec(Api.COMPLETIONS, echo=True), [text_chunk(2, "x")], "echoing"),
    ],
)
def test_what_the_engine_cannot_continue_once_sent(
    job: JobSpec, events: list[Event], why: str
) -> None:
    with pytest.raises(NotContinuable, match=why):
        continuing(job, progress_of(events, job.api))


def test_a_tool_call_not_yet_sent_runs_again_from_the_start() -> None:
    assert continuing(spec(tools=[{"type": "function"}]), progress_of(log(), Api.CHAT)) is None


def test_a_terminal_or_out_of_band_event_means_the_job_ended() -> None:
    done = [*log("x"), Event(3, EventType.DONE, b"{}")]
    assert progress_of(done, Api.CHAT).ended
    lost = [*log("x"), Event(OUT_OF_BAND, EventType.ERROR, b"{}")]
    assert progress_of(lost, Api.CHAT).ended


def test_usage_counts_each_token_once_with_the_prompt_as_first_sent() -> None:
    engine = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
    assert exact_usage(engine, 20, 10) == {
        "prompt_tokens": 20,
        "completion_tokens": 22,
        "total_tokens": 42,
    }
    assert exact_usage(None, 20, 10) is None


def test_the_continuations_first_delta_loses_its_role() -> None:
    def raw(content: str) -> bytes:
        delta = {"role": "assistant", "content": content}
        return json.dumps({"id": "x", "choices": [{"index": 0, "delta": delta}]}).encode()

    assert without_role(raw("")) is None, "nothing but the role: dropped"
    out = without_role(raw("Hi"))
    assert out is not None
    assert json.loads(out)["choices"][0]["delta"] == {"content": "Hi"}
