"""Pure ASGI middleware: request id, body-size limit, request metrics, in-flight count.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and the
latency histogram sees the last byte of an SSE stream, not its first.

The body limit is checked on ``Content-Length`` before anything is read, and counted while
a chunked body streams in. (Starlette's ``RequestBodyLimitMiddleware`` would do the same,
but it replaces the 413 with a plain-text body; OpenAI clients expect a JSON error.)
"""

from __future__ import annotations

import json
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmq.gateway.state import GatewayState
from llmq.shared.chat import new_job_id
from llmq.shared.errors import RequestTooLarge, ServiceError

logger = logging.getLogger(__name__)


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
        request_id = new_job_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0  # 0 until the response starts
        started = time.monotonic()
        st.active += 1
        st.metrics.active.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                limits = scope["state"].get("ratelimit_headers") or {}
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    *((k.encode(), v.encode()) for k, v in limits.items()),
                ]
            await send(message)

        limit = st.settings.max_body_bytes
        if scope["path"] == "/v1/files":  # a batch's input file: FILE_MAX_BYTES
            limit = st.settings.file_max_bytes
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
            logger.exception("request %s: unhandled error", request_id)
            if status:
                raise
            await _send_json(send_with_id, ServiceError("internal error"))
        finally:
            st.active -= 1
            st.metrics.active.dec()
            route = _route(scope)
            st.metrics.requests.labels(scope["method"], route, str(status or 500)).inc()
            st.metrics.latency.labels(route).observe(time.monotonic() - started)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


async def _send_json(send: Send, err: ServiceError) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
