"""A chat job's events -> the Responses API's typed stream events and ``response`` object.

``ResponseBuilder`` is a deterministic converter: fed the same job events (the worker's
chunks, as the job's log holds them), it emits the same stream events with the same
``sequence_number``s, whichever gateway runs it, live or from the log. Order, as OpenAI's:

    response.created (0)  response.in_progress (1)
    per output item: response.output_item.added
      text:  response.content_part.added, response.output_text.delta..., response.output_text.done,
             response.content_part.done
      call:  response.function_call_arguments.delta..., response.function_call_arguments.done
    response.output_item.done
    response.completed | response.incomplete (max_output_tokens, content_filter)
    | error, response.failed (the job failed, timed out, was cancelled)

``response.created`` says ``queued`` for a background response, ``in_progress`` otherwise;
``response.in_progress`` comes just before the first output. A tool call's name is the
client's (``ToolNames``: a namespaced tool is ``name`` with its ``namespace`` again).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from llmq.shared.errors import JobCancelled, ServiceError
from llmq.shared.protocol import Event, EventType
from llmq.shared.responses.request import ToolNames, chat_tools

Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


class StreamEvent(BaseModel):
    type: str
    sequence_number: int

    def frame(self) -> bytes:
        """The SSE frame: ``event: <type>`` and the event as ``data:``."""
        return b"event: %s\ndata: %s\n\n" % (self.type.encode(), self.model_dump_json().encode())


class ResponseCreated(StreamEvent):
    type: Literal["response.created"] = "response.created"
    response: dict[str, Any]


class ResponseInProgress(StreamEvent):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: dict[str, Any]


class OutputItemAdded(StreamEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: dict[str, Any]


class OutputItemDone(StreamEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: dict[str, Any]


class ContentPartAdded(StreamEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: dict[str, Any]


class ContentPartDone(StreamEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: dict[str, Any]


class OutputTextDelta(StreamEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class OutputTextDone(StreamEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class FunctionCallArgumentsDelta(StreamEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(StreamEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ResponseCompleted(StreamEvent):
    type: Literal["response.completed"] = "response.completed"
    response: dict[str, Any]


class ResponseIncomplete(StreamEvent):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: dict[str, Any]


class ResponseFailed(StreamEvent):
    type: Literal["response.failed"] = "response.failed"
    response: dict[str, Any]


class ErrorEvent(StreamEvent):
    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None


TERMINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class _Message:
    """An assistant message item being built (one ``output_text`` part)."""

    def __init__(self, item_id: str) -> None:
        self.id, self.text, self.done = item_id, "", False

    def item(self) -> dict[str, Any]:
        content = [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}]
        return {
            "type": "message",
            "id": self.id,
            "status": "completed" if self.done else "in_progress",
            "role": "assistant",
            "content": content if self.done or self.text else [],
        }


class _Call:
    """A function call item being built."""

    def __init__(self, item_id: str, call_id: str, name: str, namespace: str | None) -> None:
        self.id, self.call_id, self.name, self.namespace = item_id, call_id, name, namespace
        self.arguments, self.done = "", False

    def item(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "type": "function_call",
            "id": self.id,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "status": "completed" if self.done else "in_progress",
        }
        if self.namespace:
            item["namespace"] = self.namespace
        return item


class ResponseBuilder:
    """One response's stream events and object, built from its job's events."""

    def __init__(
        self,
        response_id: str,
        model: str,
        created_at: int,
        echo: dict[str, Any],
        names: ToolNames | None = None,
    ) -> None:
        self.id, self.model, self.created_at, self.echo = response_id, model, created_at, echo
        self.names = names or ToolNames()
        self.status: Status = "queued" if echo.get("background") else "in_progress"
        self.items: list[_Message | _Call] = []
        self._calls: dict[int, _Call] = {}  # the chat tool-call index -> its item
        self._open: _Message | _Call | None = None
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self._seq = -1
        self._started = False
        self.ended = False

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def response(self) -> dict[str, Any]:
        """The ``response`` object as it stands."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "model": self.model,
            "output": [i.item() for i in self.items],
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "reasoning": {"effort": None, "summary": None},
            **self.echo,
        }

    def start(self) -> list[StreamEvent]:
        """The first event: ``response.created``."""
        return [ResponseCreated(sequence_number=self._next(), response=self.response())]

    def feed(self, event: Event) -> list[StreamEvent]:
        """The stream events one job event makes (none for STARTED: ``in_progress`` comes
        with the first output, so that a live stream and a replayed log number alike)."""
        if self.ended or event.type is EventType.STARTED:
            return []
        if event.type is EventType.ERROR:  # (no in_progress for a job cancelled queued)
            return self.fail(ServiceError.from_wire(json.loads(event.data)))
        out = self._in_progress()
        if event.type is EventType.CHUNK:
            self._chunk(json.loads(event.data), out)
        elif event.type is EventType.DONE:
            done = json.loads(event.data)
            if done.get("final"):
                self._chunk(done["final"], out)
            self._finish(done.get("usage"), out)
        return out

    def fail(self, err: ServiceError, out: list[StreamEvent] | None = None) -> list[StreamEvent]:
        """``error`` then ``response.failed`` (``cancelled`` for a cancel)."""
        out = [] if out is None else out
        self.ended = True
        self.status = "cancelled" if isinstance(err, JobCancelled) else "failed"
        self.error = {"code": err.code or "server_error", "message": err.message}
        out.append(
            ErrorEvent(
                sequence_number=self._next(), code=err.code, message=err.message, param=err.param
            )
        )
        out.append(ResponseFailed(sequence_number=self._next(), response=self.response()))
        return out

    def _in_progress(self) -> list[StreamEvent]:
        if self._started:
            return []
        self._started = True
        self.status = "in_progress"
        return [ResponseInProgress(sequence_number=self._next(), response=self.response())]

    def _chunk(self, chunk: dict[str, Any], out: list[StreamEvent]) -> None:
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text(delta["content"], out)
            for call in delta.get("tool_calls") or []:
                self._call(call, out)
            reason = choice.get("finish_reason")
            if reason in _INCOMPLETE:
                self.incomplete = {"reason": _INCOMPLETE[reason]}

    def _text(self, text: str, out: list[StreamEvent]) -> None:
        msg = self._open if isinstance(self._open, _Message) else None
        if msg is None:
            msg = _Message(f"msg_{self.id[5:]}_{len(self.items)}")
            self._add(msg, out)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(ContentPartAdded(sequence_number=self._next(), item_id=msg.id,
                                        output_index=len(self.items) - 1, content_index=0,
                                        part=part))  # fmt: skip
        msg.text += text
        out.append(OutputTextDelta(sequence_number=self._next(), item_id=msg.id,
                                   output_index=self.items.index(msg), content_index=0,
                                   delta=text))  # fmt: skip

    def _call(self, delta: dict[str, Any], out: list[StreamEvent]) -> None:
        index = int(delta.get("index") or 0)
        function = delta.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            name, namespace = self.names.client_name(str(function.get("name") or ""))
            call_id = str(delta.get("id") or f"call_{self.id[5:21]}_{index}")
            call = _Call(f"fc_{self.id[5:]}_{len(self.items)}", call_id, name, namespace)
            self._calls[index] = call
            self._add(call, out)
        piece = function.get("arguments")
        if piece:
            call.arguments += piece
            out.append(FunctionCallArgumentsDelta(sequence_number=self._next(), item_id=call.id,
                                                  output_index=self.items.index(call),
                                                  delta=piece))  # fmt: skip

    def _add(self, item: _Message | _Call, out: list[StreamEvent]) -> None:
        self._close(out)
        self.items.append(item)
        self._open = item
        out.append(OutputItemAdded(sequence_number=self._next(),
                                   output_index=len(self.items) - 1, item=item.item()))  # fmt: skip

    def _close(self, out: list[StreamEvent]) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = self.items.index(item)
        item.done = True
        if isinstance(item, _Message):
            part = item.item()["content"][0]
            out.append(
                OutputTextDone(
                    sequence_number=self._next(),
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=item.text,
                )
            )
            out.append(
                ContentPartDone(
                    sequence_number=self._next(),
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        else:
            out.append(
                FunctionCallArgumentsDone(
                    sequence_number=self._next(),
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        out.append(OutputItemDone(sequence_number=self._next(), output_index=index,
                                  item=item.item()))  # fmt: skip

    def _finish(self, usage: dict[str, Any] | None, out: list[StreamEvent]) -> None:
        self._close(out)
        for item in self.items:  # calls the engine interleaved: each closed once
            item.done = True
        if usage:
            self.usage = _usage(usage)
        self.ended = True
        if self.incomplete is not None:
            self.status = "incomplete"
            out.append(ResponseIncomplete(sequence_number=self._next(), response=self.response()))
        else:
            self.status = "completed"
            out.append(ResponseCompleted(sequence_number=self._next(), response=self.response()))


def _usage(chat: dict[str, Any]) -> dict[str, Any]:
    """Chat usage -> Responses usage."""
    prompt = int(chat.get("prompt_tokens") or 0)
    completion = int(chat.get("completion_tokens") or 0)
    cached = int((chat.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": int(chat.get("total_tokens") or prompt + completion),
    }


def replay(builder: ResponseBuilder, events: list[Event]) -> list[StreamEvent]:
    """Every stream event of ``events`` (a job's log), ``response.created`` first."""
    out = builder.start()
    for event in events:
        out += builder.feed(event)
    return out


def from_completion(
    response_id: str, completion: dict[str, Any], echoed: dict[str, Any]
) -> dict[str, Any]:
    """A non-streamed chat completion (a batch line's answer) as a ``response`` object: its
    message and tool calls fed to a builder as one chunk."""
    names = ToolNames()
    chat_tools(echoed.get("tools") or [], names, reject_builtin=False)
    builder = ResponseBuilder(
        response_id, str(completion.get("model", "")), int(completion.get("created", 0)),
        echoed, names,
    )  # fmt: skip
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = [{**call, "index": i} for i, call in enumerate(message.get("tool_calls") or [])]
    delta = {"content": message.get("content"), "tool_calls": calls}
    chunk = {
        "choices": [{"index": 0, "finish_reason": choice.get("finish_reason"), "delta": delta}]
    }
    done = {"usage": completion.get("usage")}
    replay(
        builder,
        [Event(1, EventType.CHUNK, json.dumps(chunk).encode()),
         Event(2, EventType.DONE, json.dumps(done).encode())],
    )  # fmt: skip
    return builder.response()
