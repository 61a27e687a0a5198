"""Pure ASGI middleware: request id, request metrics and the in-flight count.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and the
latency histogram sees the last byte of an SSE stream, not its first. The body-size limit
is FastAPI's own (``max_body_size``); its 413 becomes an OpenAI error in ``gateway.errors``.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.state import GatewayState
from shared.chat import new_job_id
from shared.errors import ServiceError

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
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s: unhandled error", request_id)
            if status or not await self._internal_error(send_with_id):
                raise
        finally:
            st.active -= 1
            st.metrics.active.dec()
            route = _route(scope)
            st.metrics.requests.labels(scope["method"], route, str(status or 500)).inc()
            st.metrics.latency.labels(route).observe(time.monotonic() - started)

    @staticmethod
    async def _internal_error(send: Send) -> bool:
        """Answer 500 in OpenAI shape (with the request id) when nothing was sent yet."""
        body = json.dumps(ServiceError("internal error").body()).encode()
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        except Exception:
            return False
        return True
