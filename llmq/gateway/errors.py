"""Exception handlers: every error answer is an OpenAI error body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from llmq.shared.errors import (
    InvalidRequest,
    QueueUnavailable,
    ServiceError,
    for_http_status,
)

logger = logging.getLogger(__name__)


def error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    request.app.state.gateway.metrics.reject(exc.code, getattr(request.state, "tenant", None))
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
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


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = "request body too large" if exc.status_code == 413 else str(exc.detail)
    err = for_http_status(exc.status_code, message)
    return JSONResponse(
        err.body(), status_code=err.status, headers={**(exc.headers or {}), **err.headers()}
    )


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("Redis error on %s: %s", request.url.path, exc)
    return await _service_error(request, QueueUnavailable.because(exc))


def install(app: FastAPI) -> None:
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
