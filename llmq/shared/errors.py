"""One error hierarchy and its one mapping to an HTTP status and an OpenAI error body.

    ServiceError                      -> 500 internal_error
    ├── InvalidApiKey                 -> 401 invalid_api_key (missing, wrong or revoked key)
    ├── InvalidRequest                -> 400 invalid_request       (param names the field)
    │   ├── NotFound                  -> 404 not_found             (no such route)
    │   │   └── PreviousResponseNotFound  -> 404 previous_response_not_found
    │   ├── UnknownParameter          -> 400 unknown_parameter     (a field OpenAI's API lacks)
    │   ├── MethodNotAllowed          -> 405 method_not_allowed
    │   ├── RequestTooLarge           -> 413 request_too_large
    │   ├── HeadersTooLarge           -> 431 headers_too_large
    │   ├── ClientTimeout             -> 408 client_timeout (head or body not sent in time)
    │   ├── ModelNotFound             -> 404 model_not_found
    │   └── WrongModelKind            -> 400 model_not_supported (an embedding model asked
    │                                        for chat, or a chat model for embeddings)
    ├── Overloaded                    -> 429 + Retry-After
    │   ├── QueueFull                 ->     queue_full   (QUEUE_MODE=queue)
    │   ├── ServerBusy                ->     server_busy  (QUEUE_MODE=reject)
    │   ├── ConcurrencyLimitExceeded  ->     concurrency_limit_exceeded (the key's max)
    │   ├── RateLimitExceeded         ->     rate_limit_exceeded (the key's rpm / tpm)
    │   └── DeadlineUnattainable      ->     deadline_unattainable (its time-to-first-token
    │                                        objective cannot be met, or passed in the queue)
    ├── Unavailable                   -> 503 + Retry-After
    │   ├── EngineUnavailable         ->     engine_unavailable
    │   ├── QueueTimeout              ->     queue_timeout
    │   ├── QueueUnavailable          ->     queue_unavailable (Redis unreachable or full)
    │   └── ShuttingDown              ->     shutting_down (gateway draining)
    ├── StreamInterrupted             -> 502 stream_interrupted (events lost between worker
    │                                        and gateway: a sequence gap)
    ├── WorkerLost                    -> 502 worker_lost (the job's worker stopped beating)
    ├── RequestTimeout                -> 504 request_timeout
    ├── JobCancelled                  -> 409 cancelled (POST .../{id}/cancel)
    ├── IdempotencyKeyReused          -> 409 idempotency_key_reused (another body)
    ├── ClientClosedRequest           -> 499 client_closed_request (logged, never seen)
    ├── PayloadUndecryptable          -> 500 payload_undecryptable (sealed with a key this
    │                                        service does not hold: PAYLOAD_KEYS; not retried)
    └── UpstreamError                 -> the engine's own status and message

Each fact has one attribute: ``status``, ``code``, ``type``, ``retry_after_s``, ``message``,
``param``. Subclasses set the first four as class defaults; an instance may override one
(``UpstreamError`` takes the engine's). Every 429 and 503 carries ``Retry-After``: the
class default, or ``RETRY_AFTER_BY_STATUS`` for statuses passed through from the engine.

Errors cross Redis (worker -> gateway) as ``to_wire()`` dicts and come back with
``ServiceError.from_wire``; the gateway turns any of them into a response with ``status``,
``headers()`` and ``body()``.
"""

from __future__ import annotations

from typing import Any

# Retry-After for a 429/503 that did not come from one of our own classes (engine refusals).
RETRY_AFTER_BY_STATUS = {429: 1, 503: 1}


class ServiceError(Exception):
    """Base of every error the service answers with deliberately."""

    status: int = 500
    code: str | None = "internal_error"
    type: str = "server_error"
    retry_after_s: int | None = None

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}

    def to_wire(self) -> dict[str, Any]:
        wire = {**self.body()["error"], "status": self.status}
        if self.retry_after_s is not None:
            wire["retry_after"] = self.retry_after_s
        return wire

    @staticmethod
    def from_wire(data: dict[str, Any]) -> ServiceError:
        """Rebuild the error a worker published; unknown codes become ``UpstreamError``."""
        code = data.get("code")
        message = str(data.get("message", "error"))
        cls = _BY_CODE.get(code) if isinstance(code, str) else None
        retry = data.get("retry_after")
        if cls is not None:
            err = cls(message, param=data.get("param"))
            if isinstance(retry, int) and retry > 0:
                err.retry_after_s = retry
            return err
        return UpstreamError(
            int(data.get("status", 502)),
            message,
            error_type=str(data.get("type") or "upstream_error"),
            code=code if isinstance(code, str | int) else None,
            param=data.get("param"),
        )


class InvalidApiKey(ServiceError):
    status = 401
    code = "invalid_api_key"
    type = "invalid_request_error"


class InvalidRequest(ServiceError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class PreviousResponseNotFound(NotFound):
    """``previous_response_id`` names no stored response of the caller's key."""

    code = "previous_response_not_found"


class UnknownParameter(InvalidRequest):
    code = "unknown_parameter"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "headers_too_large"


class ClientTimeout(InvalidRequest):
    """The client did not send its request's head or body in time (the connection closes)."""

    status = 408
    code = "client_timeout"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class WrongModelKind(InvalidRequest):
    """The model does not serve this endpoint (an embedding model asked for chat, or a
    chat model for embeddings): refused before anything is queued."""

    code = "model_not_supported"


class Overloaded(ServiceError):
    status = 429
    type = "rate_limit_error"
    retry_after_s = 1


class QueueFull(Overloaded):
    code = "queue_full"


class ServerBusy(Overloaded):
    code = "server_busy"


class ConcurrencyLimitExceeded(Overloaded):
    code = "concurrency_limit_exceeded"


class RateLimitExceeded(Overloaded):
    code = "rate_limit_exceeded"


class DeadlineUnattainable(Overloaded):
    """Its time-to-first-token objective cannot be met: refused at admission (the predicted
    wait and first token exceed it), or dropped from the queue when its deadline passed
    (never run late)."""

    code = "deadline_unattainable"


class Unavailable(ServiceError):
    status = 503
    type = "server_error"
    retry_after_s = 5


class EngineUnavailable(Unavailable):
    code = "engine_unavailable"


class QueueTimeout(Unavailable):
    code = "queue_timeout"
    retry_after_s = 1


class QueueUnavailable(Unavailable):
    code = "queue_unavailable"
    retry_after_s = 2

    @classmethod
    def because(cls, exc: BaseException | None) -> QueueUnavailable:
        """The answer for a Redis error: full (maxmemory reached: writes are refused with
        "OOM command not allowed when used memory > 'maxmemory'", which redis-py raises as
        ``OutOfMemoryError`` without the OOM prefix) or unreachable."""
        if exc is not None and "'maxmemory'" in str(exc):
            return cls("the job queue is full (Redis reached its memory limit); retry")
        return cls("the job queue is unreachable; retry")


class ShuttingDown(Unavailable):
    code = "shutting_down"
    retry_after_s = 1


class StreamInterrupted(ServiceError):
    """Events of a job were lost between worker and gateway (a sequence gap)."""

    status = 502
    code = "stream_interrupted"


class WorkerLost(ServiceError):
    """The worker running the job died (its heartbeat expired); the job will not resume."""

    status = 502
    code = "worker_lost"


class RequestTimeout(ServiceError):
    status = 504
    code = "request_timeout"
    type = "timeout_error"


class JobCancelled(ServiceError):
    """The job was cancelled on request (``POST /v1/chat/completions/{id}/cancel``)."""

    status = 409
    code = "cancelled"
    type = "invalid_request_error"


class IdempotencyKeyReused(ServiceError):
    """An Idempotency-Key sent again with a different body."""

    status = 409
    code = "idempotency_key_reused"
    type = "invalid_request_error"


class ClientClosedRequest(ServiceError):
    """The client went away before the answer; the job is cancelled (nginx's 499)."""

    status = 499
    code = "client_closed_request"
    type = "invalid_request_error"


class PayloadUndecryptable(ServiceError):
    """A job's or stored completion's sealed payload does not open with PAYLOAD_KEYS (the
    key that sealed it was removed, or the bytes were altered). Retrying cannot help."""

    status = 500
    code = "payload_undecryptable"


class UpstreamError(ServiceError):
    """The engine refused or failed the request; its status and message pass through."""

    type = "upstream_error"
    code = None

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "upstream_error",
        code: str | int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.status = status if 400 <= status <= 599 else 502
        self.retry_after_s = RETRY_AFTER_BY_STATUS.get(self.status)
        self.type = error_type
        self.code = None if code is None else str(code)


def for_http_status(status: int, message: str) -> ServiceError:
    """The error for a status raised by the HTTP framework itself (no route, bad method)."""
    cls = _BY_HTTP_STATUS.get(status)
    if cls is not None:
        return cls(message)
    err = InvalidRequest(message) if status < 500 else ServiceError(message)
    err.status = status
    return err


_BY_HTTP_STATUS: dict[int, type[ServiceError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
}

_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidApiKey,
        ConcurrencyLimitExceeded,
        RateLimitExceeded,
        DeadlineUnattainable,
        InvalidRequest,
        NotFound,
        PreviousResponseNotFound,
        UnknownParameter,
        MethodNotAllowed,
        RequestTooLarge,
        HeadersTooLarge,
        ClientTimeout,
        ModelNotFound,
        WrongModelKind,
        QueueFull,
        ServerBusy,
        EngineUnavailable,
        QueueTimeout,
        QueueUnavailable,
        ShuttingDown,
        StreamInterrupted,
        WorkerLost,
        RequestTimeout,
        JobCancelled,
        IdempotencyKeyReused,
        ClientClosedRequest,
        PayloadUndecryptable,
    )
    if cls.code is not None
}
