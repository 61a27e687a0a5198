"""Request bodies (chat, completions, embeddings), read at the edge: every hostile body is
a 400, never a 500.

FastAPI's own body parsing would hand a body nested a few hundred levels deep, or holding a
lone surrogate (``"\\ud800"``, valid JSON, not encodable as UTF-8), to code that fails
later (a 500, or a job that fails in the worker after taking a slot), and would validate a
400k-message body for seconds on the event loop. Here, in order: JSON (a nesting too deep
for the parser is a 400), one iterative walk that bounds the nesting depth and rejects
unencodable strings (naming the field), the message-count cap before any model is built,
then the pydantic model, then the prompt-size cap.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from llmq.shared.chat import ChatCompletionRequest
from llmq.shared.completions import FIELDS, CompletionRequest
from llmq.shared.embeddings import (
    ENGINE_FIELDS,
    MAX_TOTAL_TOKENS,
    EmbeddingRequest,
    estimate_tokens,
)
from llmq.shared.errors import InvalidRequest
from llmq.shared.settings import Settings

MAX_JSON_DEPTH = 32  # an OpenAI request needs ~8 (tools' JSON schemas a few more)
_MAX_TOP_LOGPROBS = 20  # OpenAI's maximum


def read_json(raw: bytes, settings: Settings) -> dict[str, Any]:
    """A request body as a JSON object: byte prechecks, the parse, the nesting depth and
    unencodable strings (every API's body goes through this first)."""
    precheck(raw, settings)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidRequest(f"the body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise InvalidRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    check_tree(data)
    return data


def parse_chat_body(raw: bytes, settings: Settings) -> ChatCompletionRequest:
    data = read_json(raw, settings)
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise InvalidRequest(
            f"{len(messages)} messages; at most {settings.max_messages}", param="messages"
        )
    req = _validated(ChatCompletionRequest, data)
    check_size(req, settings)
    return req


def parse_completion_body(raw: bytes, settings: Settings) -> CompletionRequest:
    """``POST /v1/completions``: as a chat body (its prompt within MAX_PROMPT_CHARS, known
    fields only, ``n`` within MAX_N)."""
    req = _validated(CompletionRequest, read_json(raw, settings))
    if req.chars() > settings.max_prompt_chars:
        raise InvalidRequest(
            f"the prompt holds {req.chars()} characters; at most {settings.max_prompt_chars}",
            param="prompt",
        )
    _known_fields(req, settings.passthrough_fields | settings.passthrough_extra | FIELDS)
    if req.n > settings.max_n:
        raise InvalidRequest(f"n is at most {settings.max_n}", param="n")
    return req


def parse_embedding_body(raw: bytes, settings: Settings) -> EmbeddingRequest:
    """``POST /v1/embeddings``: OpenAI's shapes and limits (``shared.embeddings``), the
    inputs' estimated tokens within MAX_TOTAL_TOKENS, known fields only."""
    req = _validated(EmbeddingRequest, read_json(raw, settings))
    tokens = estimate_tokens(req.inputs())
    if tokens > MAX_TOTAL_TOKENS:
        raise InvalidRequest(
            f"the inputs hold about {tokens} tokens; at most {MAX_TOTAL_TOKENS} per request",
            param="input",
        )
    _known_fields(req, ENGINE_FIELDS | {"user"} | settings.passthrough_extra)
    return req


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _known_fields(req: BaseModel, allowed: frozenset[str] | set[str]) -> None:
    for field in req.model_extra or {}:
        if field not in allowed:
            raise InvalidRequest(f"unsupported field {field!r}", param=field)


def check_size(req: ChatCompletionRequest, settings: Settings, param: str = "messages") -> None:
    """The prompt's size caps (MAX_MESSAGES, MAX_PROMPT_CHARS), then ``check_bounds``: for
    a chat body, and for the chat a Responses request becomes (``param``: ``input``)."""
    if len(req.messages) > settings.max_messages:
        raise InvalidRequest(
            f"{len(req.messages)} messages; at most {settings.max_messages}", param=param
        )
    chars = sum(len(str(m.content or "")) for m in req.messages)
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"the messages hold {chars} characters; at most {settings.max_prompt_chars}",
            param=param,
        )
    check_bounds(req, settings)


def check_bounds(req: ChatCompletionRequest, settings: Settings) -> None:
    """What one request may ask of the engine: known fields only, bounded counts."""
    _known_fields(req, settings.passthrough_fields | settings.passthrough_extra)
    if req.n > settings.max_n:
        raise InvalidRequest(f"n is at most {settings.max_n}", param="n")
    top = (req.model_extra or {}).get("top_logprobs")
    if top is not None and (not isinstance(top, int) or not 0 <= top <= _MAX_TOP_LOGPROBS):
        raise InvalidRequest(f"top_logprobs is 0..{_MAX_TOP_LOGPROBS}", param="top_logprobs")
    if not settings.allow_media:
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(
                isinstance(part, dict) and part.get("type") != "text" for part in m.content
            ):
                raise InvalidRequest(
                    "only text parts are accepted here", param=f"messages.{i}.content"
                )


def check_max_tokens(req: ChatCompletionRequest | CompletionRequest, cap: int) -> None:
    """max_tokens / max_completion_tokens / min_tokens within ``cap`` (0: no cap known)."""
    if not cap:
        return
    extra = req.model_extra or {}
    for name, value in (
        ("max_tokens", req.max_tokens),
        ("max_completion_tokens", req.max_completion_tokens),
        ("min_tokens", extra.get("min_tokens")),
    ):
        if isinstance(value, int) and value > cap:
            raise InvalidRequest(f"{name} is at most {cap} here", param=name)


def check_stored_size(req: ChatCompletionRequest | CompletionRequest, cap: int) -> None:
    """A stored completion's size is bounded by its max_tokens: with STORE_MAX_TOKENS set,
    a store:true request must set one within it (no silent cap: vLLM refuses a max_tokens
    that does not fit the prompt's context, so the gateway cannot pick one for it)."""
    if not cap:
        return
    if not (req.max_tokens or req.max_completion_tokens):
        raise InvalidRequest(
            f"a stored completion (store, or an Idempotency-Key) needs max_tokens <= {cap}",
            param="max_tokens",
        )
    check_max_tokens(req, cap)


def precheck(raw: bytes, settings: Settings) -> None:
    """Byte counts (C speed, ~3 ms for 7 MB) that refuse what would take long to parse: a
    7 MB body of 400k messages costs ~1 s of parsing and walking, stalling every other
    request on this gateway. ``"role"`` outside strings appears once per message (inside
    a JSON string it would be escaped, ``\\"role\\"``); braces count in strings too, so
    MAX_JSON_CONTAINERS is generous."""
    if raw.count(b'"role"') > settings.max_messages:
        raise InvalidRequest(f"more than {settings.max_messages} messages", param="messages")
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > settings.max_json_containers:
        raise InvalidRequest(
            f"the body holds {containers} JSON objects/arrays (braces in text count too); "
            f"at most {settings.max_json_containers}"
        )


def check_tree(data: Any) -> None:
    """Depth at most MAX_JSON_DEPTH and every string encodable as UTF-8 (iteratively: no
    recursion for an attacker to exhaust)."""
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(data, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidRequest(
                    "a string is not valid Unicode (a lone surrogate?)", param=_param(path)
                ) from None
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidRequest(
                    f"the body is nested deeper than {MAX_JSON_DEPTH} levels", param=_param(path)
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                if isinstance(key, str):
                    stack.append((key, depth + 1, path))
                stack.append((child, depth + 1, (*path, str(key))))


def _param(path: tuple[str, ...]) -> str | None:
    return ".".join(path[:8]) or None


def check_tools(req: ChatCompletionRequest, engines_take_auto_tools: bool) -> None:
    """``tools`` with ``tool_choice`` "auto" (or absent, which vLLM reads as "auto") need an
    engine started with tool calling on; refuse them here, before anything is queued, when
    an engine serving the model said it cannot (its worker probes it: heartbeat
    ``auto_tools``). Other tool choices ("none", "required", a named function) work
    without it."""
    extra = req.model_extra or {}
    if engines_take_auto_tools or not extra.get("tools"):
        return
    if extra.get("tool_choice", "auto") != "auto":
        return
    raise InvalidRequest(
        f"`{req.model}` runs without automatic tool choice here, so `tools` with tool_choice "
        '"auto" (the default) cannot be served: send tool_choice "none", "required" or a '
        "named function, or no tools (operators: start vLLM with --enable-auto-tool-choice "
        "and a --tool-call-parser)",
        param="tools",
    )
