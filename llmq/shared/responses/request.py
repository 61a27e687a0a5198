"""The ``POST /v1/responses`` body and its conversion into the chat completion the worker runs.

Fields (OpenAI's names):

- served: ``model``, ``input`` (a string, or items: ``message`` with text parts or plain
  content, ``function_call``, ``function_call_output``; ``reasoning`` items sent back by a
  client are dropped: no model here makes them), ``instructions``, ``tools`` (function
  tools, and function tools grouped in a ``namespace``, as Codex CLI sends them: the engine
  sees ``<namespace>__<name>``, the answer says ``name`` and ``namespace`` again),
  ``tool_choice``, ``parallel_tool_calls``, ``max_output_tokens``, ``temperature``,
  ``top_p``, ``metadata``, ``store`` (default true, as OpenAI's), ``background``,
  ``previous_response_id``, ``text.format`` (``text``, ``json_schema``, ``json_object``),
  ``stream``, ``service_tier`` (``flex``: the low band, as for chat);
- accepted and ignored (OpenAI's clients send them; they mean nothing here): ``include``,
  ``reasoning``, ``client_metadata``, ``safety_identifier``, ``truncation``,
  ``stream_options``, ``prompt_cache_key``, ``prompt_cache_retention``, ``max_tool_calls``,
  ``top_logprobs``, ``user``, ``text.verbosity``;
- built-in tools this service cannot run (``web_search``, ``file_search``,
  ``code_interpreter``, ``mcp``, ``custom``, ...) are left out of what the engine sees and
  named in the ``x-llmq-omitted-tools`` header, or refused (400) with
  RESPONSES_BUILTIN_TOOLS=reject;
- any other field is a 400 naming it (``unknown_parameter``), as OpenAI's is.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmq.shared.chat import ChatCompletionRequest, Metadata
from llmq.shared.errors import InvalidRequest, UnknownParameter

IGNORED_FIELDS = frozenset(
    {
        "include",
        "reasoning",
        "client_metadata",
        "safety_identifier",
        "truncation",
        "stream_options",
        "prompt_cache_key",
        "prompt_cache_retention",
        "max_tool_calls",
        "top_logprobs",
        "user",
    }
)
NAMESPACE_SEP = "__"  # the engine's name of tool ``name`` in namespace ``ns``: ns__name


def new_response_id() -> str:
    """OpenAI-style response id (``resp_`` + 48 hex digits): the job's id too."""
    return "resp_" + secrets.token_hex(24)


class Part(BaseModel):
    """One content part of an input message (text only: other kinds are refused)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str = ""
    refusal: str = ""


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or p.refusal for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[Part]

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.text for p in self.output)


class ReasoningItem(BaseModel):
    """Sent back by clients that keep reasoning (Codex CLI); dropped: no model here made it."""

    model_config = ConfigDict(extra="allow")

    type: Literal["reasoning"]


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
    Field(discriminator="type"),
]


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # verbosity: accepted, ignored

    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(BaseModel):
    """``POST /v1/responses`` body (see the module docstring for what each field does)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: Metadata | None = None
    store: bool = True
    background: bool = False
    previous_response_id: str | None = Field(None, max_length=256)
    text: TextOptions | None = None
    stream: bool = False
    service_tier: str | None = Field(None, max_length=32)
    # Accepted and ignored (IGNORED_FIELDS).
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None
    safety_identifier: str | None = None
    truncation: str | None = None
    stream_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    user: str | None = None
    # Fields the operator lets through to the engine (PASSTHROUGH_EXTRA: e.g. a test
    # engine's knobs); never part of OpenAI's API.
    engine_extra: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def items(self) -> list[InputItem]:
        """``input`` as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


def parse_request(
    data: dict[str, Any], engine_extra: frozenset[str] = frozenset()
) -> ResponsesRequest:
    """The body as a ``ResponsesRequest``; an unknown field is a 400 naming it (before the
    model validates the rest, so that the message says what OpenAI's says). Fields named in
    ``engine_extra`` (PASSTHROUGH_EXTRA) go to the engine as they are."""
    extra = {k: v for k, v in data.items() if k in engine_extra}
    data = {k: v for k, v in data.items() if k not in engine_extra}
    for field in data:
        if field not in ResponsesRequest.model_fields or field == "engine_extra":
            raise UnknownParameter(f"Unknown parameter: '{field}'.", param=field)
    items = data.get("input")
    if isinstance(items, list):  # a message may leave out its type (EasyInputMessage)
        data = {
            **data,
            "input": [
                {**i, "type": "message"} if isinstance(i, dict) and "type" not in i else i
                for i in items
            ],
        }
    req = ResponsesRequest.model_validate(data)
    req.engine_extra = extra
    return req


class ToolNames:
    """What the engine calls each function tool, and back: a namespaced tool's engine name
    is ``<namespace>__<name>``."""

    def __init__(self) -> None:
        self._back: dict[str, tuple[str, str | None]] = {}

    def engine_name(self, name: str, namespace: str | None) -> str:
        flat = f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name
        self._back[flat] = (name, namespace)
        return flat

    def client_name(self, engine_name: str) -> tuple[str, str | None]:
        """(name, namespace) the client knows a tool the engine called by."""
        return self._back.get(engine_name, (engine_name, None))


def chat_tools(
    tools: list[dict[str, Any]], names: ToolNames, reject_builtin: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """The function tools as chat tools, and the built-in tools left out (by type)."""
    out: list[dict[str, Any]] = []
    omitted: list[str] = []
    for i, tool in enumerate(tools):
        kind = str(tool.get("type", ""))
        if kind == "function":
            out.append(_chat_tool(tool, names, None, f"tools.{i}"))
        elif kind == "namespace":
            ns = str(tool.get("name") or "")
            if not ns:
                raise InvalidRequest("a namespace tool needs a name", param=f"tools.{i}.name")
            for j, inner in enumerate(tool.get("tools") or []):
                where = f"tools.{i}.tools.{j}"
                if not isinstance(inner, dict) or inner.get("type") != "function":
                    omitted.append(f"{ns}.{inner.get('type') if isinstance(inner, dict) else '?'}")
                    continue
                out.append(_chat_tool(inner, names, ns, where))
        elif reject_builtin:
            raise InvalidRequest(
                f"the built-in tool {kind!r} is not served here (only function tools are)",
                param=f"tools.{i}.type",
            )
        else:
            omitted.append(kind or "?")
    return out, omitted


def _chat_tool(
    tool: dict[str, Any], names: ToolNames, namespace: str | None, where: str
) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("a function tool needs a name", param=f"{where}.name")
    function: dict[str, Any] = {"name": names.engine_name(name, namespace)}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None, names: ToolNames) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        engine = names.engine_name(choice["name"], choice.get("namespace"))
        return {"type": "function", "function": {"name": engine}}
    return "auto"  # a built-in tool's choice: the engine has no such tool


def chat_messages(
    instructions: str | None, items: list[InputItem], names: ToolNames
) -> list[dict[str, Any]]:
    """The conversation as chat messages: instructions first (as system), then each item;
    consecutive function calls join one assistant message (after its text, if any)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {
                    "name": names.engine_name(item.name, item.namespace),
                    "arguments": item.arguments,
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def _response_format(text: TextOptions | None) -> dict[str, Any] | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise InvalidRequest("text.format json_schema needs a schema", param="text.format.schema")
    schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def to_chat(
    req: ResponsesRequest,
    context: list[InputItem],
    *,
    reject_builtin: bool = False,
) -> tuple[ChatCompletionRequest, ToolNames, list[str]]:
    """The chat completion that answers ``req`` after ``context`` (the items of the
    ``previous_response_id`` chain), the tool names' mapping and the built-in tools left
    out. Always a stream with usage: the gateway builds every answer from chunks."""
    names = ToolNames()
    tools, omitted = chat_tools(req.tools, names, reject_builtin)
    body: dict[str, Any] = {
        "model": req.model,
        "messages": chat_messages(req.instructions, [*context, *req.items()], names),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if not body["messages"]:
        raise InvalidRequest("input is empty", param="input")
    if tools:
        body["tools"] = tools
        choice = _chat_tool_choice(req.tool_choice, names)
        if choice is not None:
            body["tool_choice"] = choice
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                     ("top_p", "top_p"), ("service_tier", "service_tier")):  # fmt: skip
        value = getattr(req, src)
        if value is not None:
            body[dst] = value
    response_format = _response_format(req.text)
    if response_format is not None:
        body["response_format"] = response_format
    return ChatCompletionRequest.model_validate({**req.engine_extra, **body}), names, omitted


def echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request's fields a ``response`` object repeats (kept with a stored response)."""
    fmt = req.text.format if req.text else None
    text_format: dict[str, Any] = {"type": "text"}
    if fmt is not None and fmt.type != "text":
        text_format = fmt.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "store": req.store,
        "background": req.background,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "text": {"format": text_format},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools,
        "truncation": "disabled",
        "user": req.user,
    }


def items_json(items: list[InputItem]) -> list[dict[str, Any]]:
    """Items as stored (and listed by ``input_items``): plain JSON, OpenAI's shape."""
    return [json.loads(i.model_dump_json(exclude_none=True, by_alias=True)) for i in items]


def parse_items(raw: list[dict[str, Any]]) -> list[InputItem]:
    """Stored items back into their models."""
    return [ResponsesRequest.model_validate({"model": "-", "input": [i]}).items()[0] for i in raw]


ECHO_KEY = "llmq_response"  # a batch line's echoed fields, inside its (sealed) body


def batch_body(data: dict[str, Any], engine_extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A ``/v1/responses`` batch line's body as the chat body its job runs, with the fields
    its ``response`` repeats under ``ECHO_KEY`` (taken off before the engine sees it). A
    batch line stands alone: no ``previous_response_id``, ``background`` or ``stream``."""
    req = parse_request(data, engine_extra)
    for field in ("previous_response_id", "background", "stream"):
        if getattr(req, field):
            raise InvalidRequest(f"{field} is not served in a batch", param=f"body.{field}")
    chat, _, _ = to_chat(req, [])
    body = chat.model_dump(mode="json", exclude_unset=True)
    body["stream"] = False
    body.pop("stream_options", None)
    body[ECHO_KEY] = echo(req)
    return body
