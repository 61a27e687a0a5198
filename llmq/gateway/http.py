"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with bounds a client cannot
talk its way around.

httptools has no limit on a request's head: it buffers a header of any size until its end
arrives, and uvicorn closes neither a connection that never sends a request nor one that
sends its head one byte a minute. Each such socket holds a file descriptor and counts toward
``limit_concurrency``, so a few hundred of them lock every other client out. This subclass
(uvicorn takes it as ``Config(http=...)``) adds:

- **head size**: a request line plus headers over ``MAX_HEADER_BYTES``, or more than
  ``MAX_HEADERS`` headers, is answered 431 and the connection closed, while it is still
  arriving, so at most one socket read beyond the limit is ever buffered;
- **head deadline**: a connection must deliver a complete head within
  ``CLIENT_HEAD_TIMEOUT_S`` of opening (or of its first byte, after a keep-alive pause,
  which uvicorn's ``timeout_keep_alive`` bounds);
- **body deadline**: the body must be complete within ``CLIENT_BODY_TIMEOUT_S`` of the
  head's end.

A connection past a deadline gets 408 (if no response has started) and is closed. Responses,
including long SSE streams, are never timed here: the send timeout of the stream and
REQUEST_TIMEOUT_S bound those.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmq.gateway.middleware import new_request_id
from llmq.shared.errors import ClientTimeout, HeadersTooLarge, ServiceError
from llmq.shared.settings import Settings

logger = logging.getLogger(__name__)


_LINGER_S = 2.0


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the answer is in ``_refusal``."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """Set by ``guarded_protocol(settings)``, which fills in the limits below."""

    max_header_bytes = 32 * 1024
    max_headers = 100
    head_timeout_s = 10.0
    body_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Two measures of the current head, each never above its true size: the bytes of the
        # parts the parser has completed (request target, header names and values), and the
        # bytes of reads that ended with the head still incomplete (all of them head).
        self._parsed_bytes = 0
        self._pending_bytes = 0
        self._header_count = 0
        self._in_head = True
        self._refusal: ServiceError | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._received = False
        super().connection_made(transport)
        self._arm(self.head_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._refusal is not None:
            return
        in_head = self._in_head
        super().data_received(data)
        if in_head and self._in_head and self._refusal is None:
            # The whole chunk was head and the head is still incomplete.
            self._pending_bytes += len(data)
            if self._pending_bytes > self.max_header_bytes:
                self._refuse(HeadersTooLarge(self._too_large()))

    # Parser callbacks.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._parsed_bytes = 0
        self._pending_bytes = 0
        self._header_count = 0
        if self._deadline is None:
            self._arm(self.head_timeout_s, "head")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # the parse stopped because _count refused
            self._send_error(self._refusal)
        else:
            super().send_400_response(msg)

    # Limits.
    def _count(self, size: int) -> None:
        self._parsed_bytes += size
        if self._header_count > self.max_headers or self._parsed_bytes > self.max_header_bytes:
            self._refusal = HeadersTooLarge(self._too_large())
            raise _Refused

    def _too_large(self) -> str:
        return f"at most {self.max_headers} headers of {self.max_header_bytes} bytes in all"

    def _refuse(self, err: ServiceError) -> None:
        self._refusal = err
        self._send_error(err)

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, seconds, part)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, seconds: float, part: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self._refusal = ClientTimeout(f"request {part} not received within {seconds:g}s")
        self._send_error(self._refusal)

    def _send_error(self, err: ServiceError) -> None:
        """The error as the app would send it (OpenAI body, request id), then close."""
        self._disarm()
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app, if it runs, reads a disconnect
        body = json.dumps(err.body()).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
        head = [
            b"HTTP/1.1 %d %s\r\n" % (err.status, reason.get(err.status, b"Error")),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: %s\r\n" % new_request_id().encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self._received and self.transport.can_write_eof():
            # Lingering close: closing with unread bytes in the socket would send a reset
            # that can destroy this answer before the client reads it. Half-close instead,
            # drop what still arrives (data_received ignores it), close after _LINGER_S.
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()
        logger.info("connection refused: %d %s", err.status, err.code)


def guarded_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this deployment's limits."""
    limits = {
        "max_header_bytes": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "head_timeout_s": settings.client_head_timeout_s,
        "body_timeout_s": settings.client_body_timeout_s,
    }
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), limits)
