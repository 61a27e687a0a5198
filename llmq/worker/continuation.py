"""Continuing a migrated job (``queue.migration``): what its client already has, read back
from its log, and the engine request that goes on from there.

A chat answer goes on as vLLM continues an assistant message: the original messages plus
the text sent so far as a final assistant message, with ``continue_final_message: true``
and ``add_generation_prompt: false``; a legacy completion's prompt gets the text appended.
Its token limit is reduced by the tokens already made, which the engine counts
(``/tokenize`` of the prompt with and without the answer so far), and those counts make the
final usage exact: each token counted once, the prompt as the client sent it.

What cannot be continued once its first byte reached the client (a tool call's arguments,
reasoning, structured output, several choices, a completion of token ids or echoing its
prompt) ends with ``worker_lost`` as before; a job that had sent nothing of its answer yet
(only STARTED, or a bare role delta) runs again from the start, its events numbered on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmq.shared.protocol import OUT_OF_BAND, TERMINAL, Api, Event, EventType, JobSpec

# vLLM's completions answer at most this many tokens when the request says nothing.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_STRUCTURED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_STRUCTURED_FORMATS = ("json_object", "json_schema")


class NotContinuable(Exception):
    """The job's answer cannot be continued from where its client is (the message says why)."""


@dataclass
class Progress:
    """What a migrated job's client already has."""

    seq: int = 0  # its last event (0: none: the job starts as a new one)
    texts: dict[int, str] = field(default_factory=dict)  # choice index -> the text sent
    chunks: int = 0  # deltas that carried text
    chunked: bool = False  # a delta reached it (the role was sent)
    ended: bool = False  # its terminal event is logged: only its release was missing
    blocker: str = ""  # what was being streamed that cannot be continued ("": none)

    @property
    def text(self) -> str:
        return self.texts.get(0, "")

    @property
    def started(self) -> bool:
        """Whether any of the answer reached the client."""
        return bool(self.chunks or self.blocker)


def progress_of(events: list[Event], api: Api) -> Progress:
    """The progress a job's logged events (opened) show."""
    out = Progress()
    for ev in events:
        if ev.seq == OUT_OF_BAND or ev.type in TERMINAL:
            out.ended = True
        out.seq = max(out.seq, ev.seq)
        if ev.type is not EventType.CHUNK:
            continue
        out.chunked = True
        chunk = json.loads(ev.data)
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index") or 0)
            if api is Api.COMPLETIONS:
                text = choice.get("text") or ""
            else:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                if delta.get("tool_calls") or delta.get("function_call"):
                    out.blocker = "a tool call was being streamed"
                elif delta.get("reasoning_content") or delta.get("reasoning"):
                    out.blocker = "reasoning was being streamed"
            if text:
                out.texts[index] = out.texts.get(index, "") + text
                out.chunks += 1
    if len(out.texts) > 1:
        out.blocker = out.blocker or "several choices were being streamed"
    return out


@dataclass
class Continuation:
    """The engine request that continues a job, and how its usage is made exact."""

    body: dict[str, Any]
    prompt: dict[str, Any]  # /tokenize: the prompt as first sent
    extended: dict[str, Any]  # /tokenize: the prompt with the answer so far
    limit_key: str | None  # the body's token limit field (None: no limit)
    limit: int = 0


def _blocker(spec: JobSpec, progress: Progress) -> str:
    body = spec.body
    if progress.blocker:
        return progress.blocker
    if int(body.get("n") or 1) > 1 or int(body.get("best_of") or 1) > 1:
        return "several choices were asked for"
    fmt = body.get("response_format") or {}
    if (isinstance(fmt, dict) and fmt.get("type") in _STRUCTURED_FORMATS) or any(
        body.get(k) is not None for k in (*_STRUCTURED, "structured_outputs")
    ):
        return "structured output cannot be continued by the engine"
    if spec.api is Api.COMPLETIONS:
        if not isinstance(body.get("prompt"), str):
            return "a completion of token ids or of several prompts"
        if body.get("echo"):
            return "a completion echoing its prompt"
    return ""


def continuing(spec: JobSpec, progress: Progress) -> Continuation | None:
    """The continuation of ``spec`` (its body opened), or None when none of its answer reached
    the client (it runs from the start). Raises NotContinuable."""
    if not progress.started:
        return None
    blocker = _blocker(spec, progress)
    if blocker:
        raise NotContinuable(blocker)
    body, text = spec.body, progress.text
    passed: dict[str, Any] = {
        k: body[k] for k in ("chat_template", "chat_template_kwargs") if k in body
    }
    if spec.api is Api.COMPLETIONS:
        prompt = {"model": body.get("model"), "prompt": body["prompt"]}
        extended = {**prompt, "prompt": body["prompt"] + text}
        out = {**body, "prompt": body["prompt"] + text}
        key: str | None = "max_tokens"
        limit = int(body.get("max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS)
    else:
        messages = [*body["messages"], {"role": "assistant", "content": text}]
        prompt = {"model": body.get("model"), "messages": body["messages"], **passed}
        if body.get("tools"):
            prompt["tools"] = body["tools"]
        prompt["add_generation_prompt"] = True
        cont = {"add_generation_prompt": False, "continue_final_message": True}
        extended = {**prompt, "messages": messages, **cont}
        out = {**body, "messages": messages, **cont}
        key = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k)), None)
        limit = int(body[key]) if key else 0
    return Continuation(out, prompt, extended, key, limit)


def limited(cont: Continuation, made: int) -> dict[str, Any] | None:
    """The body with its token limit reduced by the ``made`` tokens already sent; None when
    nothing is left to make (the answer reached its limit as it was cut)."""
    if cont.limit_key is None:
        return cont.body
    left = cont.limit - made
    if left < 1:
        return None
    return {**cont.body, cont.limit_key: left}


def exact_usage(usage: dict[str, Any] | None, prompt: int, made: int) -> dict[str, Any] | None:
    """The whole answer's usage from the continuation's: the prompt as first sent
    (``prompt`` tokens), and the ``made`` tokens sent before counted once, as completion."""
    if usage is None:
        return None
    completion = made + int(usage.get("completion_tokens") or 0)
    return {
        **usage,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def without_role(raw: bytes) -> bytes | None:
    """A continuation's first delta without the ``role`` its client already has; None when
    nothing else is left in it (vLLM's first chunk: the role and empty content)."""
    chunk = json.loads(raw)
    left = False
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            delta.pop("role", None)
            if any(v not in (None, "") for v in delta.values()):
                left = True
        if choice.get("finish_reason") or choice.get("logprobs") or "text" in choice:
            left = True
    if not left and not chunk.get("usage"):
        return None
    return json.dumps(chunk, separators=(",", ":")).encode()
