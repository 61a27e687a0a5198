"""Pure ASGI middleware: request id, body-size limit, request metrics, in-flight count and
the access log (one line per request, see ``_access``).

A request's id (``x-request-id``) is ``req_…`` of its own, unless a chat completion was
admitted for it: then the route replaces it with the completion's id (``chatcmpl-…``, the
job id in Redis and in the worker's log), so the two lines of one request can be joined.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and the
latency histogram sees the last byte of an SSE stream, not its first.

The body limit is checked on ``Content-Length`` before anything is read, and counted while
a chunked body streams in. (Starlette's ``RequestBodyLimitMiddleware`` would do the same,
but it replaces the 413 with a plain-text body; OpenAI clients expect a JSON error.)
"""

from __future__ import annotations

import logging
import secrets
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmq.gateway.error_handlers import render
from llmq.gateway.fallbacks import FALLBACK_HEADER
from llmq.gateway.state import GatewayState
from llmq.shared import tracing
from llmq.shared.errors import RequestTooLarge, ServiceError
from llmq.shared.logs import record_line

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("llmq.access")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        state = scope.setdefault("state", {})
        state["request_id"] = new_request_id()  # the chat route may replace it (see above)
        status = 0  # 0 until the response starts
        sent = 0  # body bytes sent
        started = time.monotonic()
        st.active += 1
        st.metrics.active.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                limits = state.get("ratelimit_headers") or {}
                fallback = state.get("fallback")
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", state["request_id"].encode()),
                    *((k.encode(), v.encode()) for k, v in limits.items()),
                    *(((FALLBACK_HEADER.encode(), fallback.encode()),) if fallback else ()),
                ]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        limit = self._body_limit(scope)
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # FastAPI re-raises HTTPException from body parsing; gateway.errors maps it.
                raise HTTPException(413)
            return message

        try:
            # Header size and count are bounded before this, by the HTTP protocol (http.py).
            if _declared_length(scope) > limit:
                await _send_json(send_with_id, RequestTooLarge(_too_large(limit)))
            else:
                await self.app(scope, receive_limited, send_with_id)
        except Exception:
            logger.exception("request %s: unhandled error", state["request_id"])
            if status:
                raise
            await _send_json(send_with_id, ServiceError("internal error"))
        finally:
            self._ended(scope, status or 500, time.monotonic() - started, sent)

    def _body_limit(self, scope: Scope) -> int:
        if scope["path"] == "/v1/files":  # a batch's input file: FILE_MAX_BYTES
            return self.state.settings.file_max_bytes
        return self.state.settings.max_body_bytes

    def _ended(self, scope: Scope, status: int, elapsed: float, sent: int) -> None:
        """A request ended: the in-flight count, its metrics and its access log line."""
        st = self.state
        st.active -= 1
        st.metrics.active.dec()
        route = _route(scope)
        st.metrics.requests.labels(scope["method"], route, str(status)).inc()
        model = str(scope.get("state", {}).get("model", ""))  # a chat request's, once known
        st.metrics.latency.labels(route, model).observe(elapsed, exemplar=tracing.exemplar())
        _access(scope, route, status, elapsed, sent)


def _access(scope: Scope, route: str, status: int, elapsed: float, sent: int) -> None:
    """The access log line: metadata only (never a body, a query string or a header
    value: a secret or a prompt could be in them). An unknown path is logged escaped."""
    state = scope["state"]
    fields = {
        "method": scope["method"],
        "route": route,
        "status": status,
        "ms": round(elapsed * 1000, 1),
        "id": state["request_id"],
        "key": state.get("tenant", ""),
        "bytes": sent,
    }
    if route == "unmatched":
        fields["path"] = scope.get("path", "")  # escaped by record_line
    record_line(access_logger, "request", fields)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


async def _send_json(send: Send, err: ServiceError) -> None:
    headers, body = render(err)
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
