"""Exception handlers: every error answer is an OpenAI error body.

``render`` is the one rendering of an error answer (body, content type, ``Retry-After``):
the exception handlers here, the ASGI middleware's refusals (413 before the body is read, a
500 of last resort) and the HTTP protocol's (408, 431, written on the socket) all use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from llmq.shared.errors import (
    InvalidRequest,
    QueueUnavailable,
    ServiceError,
    for_http_status,
)
from llmq.shared.queue.pubsub import closed_transport

logger = logging.getLogger(__name__)


def render(err: ServiceError) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """An error answer's headers (content type and length, ``Retry-After``) and body."""
    body = json.dumps(err.body(), separators=(",", ":"), ensure_ascii=False).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    return headers, body


def error_response(err: ServiceError, extra: Mapping[str, str] | None = None) -> Response:
    """``err`` as a response; ``extra`` headers too (e.g. a 405's ``Allow``)."""
    headers, body = render(err)
    response = Response(body, status_code=err.status)
    extras = [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    response.raw_headers = headers + extras
    return response


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    request.app.state.gateway.metrics.reject(
        exc.code, getattr(request.state, "tenant", None), getattr(request.state, "model", "")
    )
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return error_response(InvalidRequest(f"malformed JSON body: {first.get('ctx', {})}"))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_response(InvalidRequest(message, param=param))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "request body too large" if exc.status_code == 413 else str(exc.detail)
    return error_response(for_http_status(exc.status_code, message), exc.headers)


async def _redis_error(request: Request, exc: Exception) -> Response:
    logger.warning("Redis error on %s: %s", request.url.path, exc)
    return await _service_error(request, QueueUnavailable.because(exc))


async def _runtime_error(request: Request, exc: Exception) -> Response:
    """A write on a Redis socket the server closed (uvloop's RuntimeError, which redis-py
    passes on as is): a lost Redis, not a bug. Any other RuntimeError is one: re-raised."""
    if not closed_transport(exc):
        raise exc
    return await _redis_error(request, exc)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(RuntimeError, _runtime_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
