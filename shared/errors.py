"""One error hierarchy and its one mapping to an HTTP status and an OpenAI error body.

    ServiceError                      -> 500 internal_error
    ├── InvalidRequest                -> 400 invalid_request       (param names the field)
    ├── RequestTooLarge               -> 413 request_too_large
    ├── ModelNotFound                 -> 404 model_not_found
    ├── Overloaded                    -> 429 + Retry-After
    │   ├── QueueFull                 ->     queue_full   (QUEUE_MODE=queue)
    │   └── ServerBusy                ->     server_busy  (QUEUE_MODE=reject)
    ├── Unavailable                   -> 503 + Retry-After
    │   ├── EngineUnavailable         ->     engine_unavailable
    │   ├── QueueTimeout              ->     queue_timeout
    │   ├── QueueUnavailable          ->     queue_unavailable (Redis unreachable)
    │   └── ShuttingDown              ->     shutting_down (gateway draining)
    ├── RequestTimeout                -> 504 request_timeout
    ├── ClientClosedRequest           -> 499 client_closed_request (logged, never seen)
    └── UpstreamError                 -> the engine's own status and message

Errors cross Redis (worker -> gateway) as ``to_wire()`` dicts and come back with
``ServiceError.from_wire``; the gateway turns any of them into a response with ``status``,
``headers()`` and ``body()``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base of every error the service answers with deliberately."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    retry_after_s: int | None = None

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def error_code(self) -> str | None:
        return self.code

    @property
    def error_type(self) -> str:
        return self.type

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.error_code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}

    def to_wire(self) -> dict[str, Any]:
        return {**self.body()["error"], "status": self.http_status}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> ServiceError:
        """Rebuild the error a worker published; unknown codes become ``UpstreamError``."""
        code = data.get("code")
        message = str(data.get("message", "error"))
        cls = _BY_CODE.get(code) if isinstance(code, str) else None
        if cls is not None:
            return cls(message, param=data.get("param"))
        return UpstreamError(
            int(data.get("status", 502)),
            message,
            error_type=str(data.get("type") or "upstream_error"),
            code=code if isinstance(code, str | int) else None,
            param=data.get("param"),
        )


class InvalidRequest(ServiceError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class RequestTooLarge(ServiceError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class ModelNotFound(ServiceError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


class Overloaded(ServiceError):
    status = 429
    type = "rate_limit_error"
    retry_after_s = 1


class QueueFull(Overloaded):
    code = "queue_full"


class ServerBusy(Overloaded):
    code = "server_busy"


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


class ShuttingDown(Unavailable):
    code = "shutting_down"
    retry_after_s = 1


class RequestTimeout(ServiceError):
    status = 504
    code = "request_timeout"
    type = "timeout_error"


class ClientClosedRequest(ServiceError):
    """The client went away before the answer; the job is cancelled (nginx's 499)."""

    status = 499
    code = "client_closed_request"
    type = "invalid_request_error"


class UpstreamError(ServiceError):
    """The engine refused or failed the request; its status and message pass through."""

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
        self._status = status if 400 <= status <= 599 else 502
        if self._status in (429, 503):  # every 429/503 we send carries Retry-After
            self.retry_after_s = 1
        self._type = error_type
        self._code = None if code is None else str(code)

    @property
    def http_status(self) -> int:
        return self._status

    @property
    def error_code(self) -> str | None:
        return self._code

    @property
    def error_type(self) -> str:
        return self._type


_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        RequestTooLarge,
        ModelNotFound,
        QueueFull,
        ServerBusy,
        EngineUnavailable,
        QueueTimeout,
        QueueUnavailable,
        ShuttingDown,
        RequestTimeout,
    )
}
