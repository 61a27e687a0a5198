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

- **room for new clients**: the process's open connections are capped below what its file
  descriptors allow (``connection_cap``: the soft limit, raised to the hard one at start,
  less a reserve for Redis, files and the metrics port). At the cap, a new connection
  closes the oldest one that is not in a request (it has not completed a head, or idles
  between keep-alive requests), so idle sockets can never lock a new client out; when every
  connection is in a request, uvicorn answers the newcomer 503 (``limit_concurrency``).
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmq.gateway.error_handlers import render
from llmq.gateway.middleware import new_request_id
from llmq.shared import seams
from llmq.shared.errors import ClientTimeout, HeadersTooLarge, ServiceError
from llmq.shared.seams import Pin
from llmq.shared.settings import Settings

logger = logging.getLogger(__name__)


_LINGER_S = 2.0
# File descriptors kept for what is not a client connection: Redis connections (commands,
# pub/sub, the registry), the listening and metrics sockets, log and metrics files.
FD_RESERVE = 128
# Connections uvicorn may count above the cap (those closed for a newcomer leave its count
# an event-loop turn later); within FD_RESERVE.
CAP_SLACK = 32

_OVERRIDDEN = "overridden: ours counts the head or arms a deadline, then calls uvicorn's"
# What this module overrides of uvicorn's httptools protocol or relies on (shared.seams),
# pinned against uvicorn 0.54.0 (pyproject: <0.55). After an upgrade, read uvicorn's new
# source of each member, adapt this module if needed, then update the hash.
UVICORN_SEAM: dict[str, Pin] = {
    "HttpToolsProtocol.__init__": Pin(
        "(self, config: 'Config', server_state: 'ServerState', app_state: 'dict[str, Any]', "
        "_loop: 'asyncio.AbstractEventLoop | None' = None) -> 'None'",
        "4f08999410347141468656d82e71ffebccb59f09e41909a3753a810eeed685fa",
        "sets self.loop and self.cycle (None between requests), which the deadlines use",
    ),
    "HttpToolsProtocol.connection_made": Pin(
        "(self, transport: 'asyncio.Transport') -> 'None'",
        "6efb565ff3d36b916c29bd42330a2b99b601b48932389e396e5ac53dbef6b91c",
        _OVERRIDDEN + " (sets self.transport, which refusals write to)",
    ),
    "HttpToolsProtocol.connection_lost": Pin(
        "(self, exc: 'Exception | None') -> 'None'",
        "c91a4c9bf2e29c554a97418b5f3064e97f6e0ceaba3b90fc35a3460076c705ab",
        "overridden: the deadline is cancelled first",
    ),
    "HttpToolsProtocol.data_received": Pin(
        "(self, data: 'bytes') -> 'None'",
        "010a7ae59a5d3b1a5e7326ce246878568629d126a076d8af5ba10cab040fae43",
        _OVERRIDDEN + "; a parser callback's exception must end up in send_400_response",
    ),
    "HttpToolsProtocol.on_message_begin": Pin(
        "(self) -> 'None'",
        "96d377fdc7c2baef943c2bd245003abc53566ddb35777e0f4c7bc754198b5457",
        _OVERRIDDEN,
    ),
    "HttpToolsProtocol.on_url": Pin(
        "(self, url: 'bytes') -> 'None'",
        "37be44e962b04ca87f76428ff8d7a3306ab601ffd5793d185e87c2295f0c6b6e",
        _OVERRIDDEN,
    ),
    "HttpToolsProtocol.on_header": Pin(
        "(self, name: 'bytes', value: 'bytes') -> 'None'",
        "65d62c044f61fdbd354dcb3401aa590789259bfbdbc1c07512150ec924258cd6",
        _OVERRIDDEN,
    ),
    "HttpToolsProtocol.on_headers_complete": Pin(
        "(self) -> 'None'",
        "1ea8589acfad92d8ff9182775f337d98fc469e0fa39642a83195fca920f5ca96",
        _OVERRIDDEN,
    ),
    "HttpToolsProtocol.on_message_complete": Pin(
        "(self) -> 'None'",
        "1fbad42dc31fc01fd4106a9885b2a2e0f6ce8d38241a3df0f615c6a8663493e0",
        _OVERRIDDEN,
    ),
    "HttpToolsProtocol.send_400_response": Pin(
        "(self, msg: 'str') -> 'None'",
        "ae5a4a3782b646fdd2d0ec5cfc28814fda9b6e3464bf6f45c58839982319bd0c",
        "overridden: a refusal of ours is answered with its own status (431) instead",
    ),
    "RequestResponseCycle.__init__": Pin(
        None,
        "4d2f220910c33c12f2891cbf2fb89ad364464e1a189e7492e8dc43167563057a",
        "sets response_started (read by the deadline), disconnected (set by a refusal) and "
        "response_complete (a connection idle between requests may be closed for a newcomer)",
    ),
}


def seam_problems(check_source: bool = True) -> list[str]:
    """What no longer matches between ``UVICORN_SEAM`` and the installed uvicorn."""
    return seams.seam_problems(
        httptools_impl, UVICORN_SEAM, library="uvicorn", check_source=check_source
    )


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the answer is in ``_refusal``."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """Set by ``guarded_protocol(settings)``, which fills in the limits below."""

    max_header_bytes = 32 * 1024
    max_headers = 100
    head_timeout_s = 10.0
    body_timeout_s = 60.0
    connection_cap = 1000
    # This process's open connections, oldest first (one server per process).
    open_connections: dict[GuardedHttpProtocol, None] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.open_connections) >= self.connection_cap:
            self._make_room()
        self.open_connections[self] = None
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
        self.open_connections.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """Not in a request: no complete head yet, or between keep-alive requests."""
        if self._refusal is not None or self.transport.is_closing():
            return False
        return self._in_head or self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        for oldest in self.open_connections:
            if oldest._idle():
                oldest._refusal = ClientTimeout("connection closed to make room for new clients")
                logger.info("connections at the cap (%d): closing the oldest idle one",
                            self.connection_cap)  # fmt: skip
                oldest._send_error(oldest._refusal)
                return

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
        headers, body = render(err)
        headers += [(b"x-request-id", new_request_id().encode()), (b"connection", b"close")]
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
        head = b"HTTP/1.1 %d %s\r\n" % (err.status, reason.get(err.status, b"Error"))
        head += b"".join(b"%s: %s\r\n" % kv for kv in headers)
        self.transport.write(head + b"\r\n" + body)
        if self._received and self.transport.can_write_eof():
            # Lingering close: closing with unread bytes in the socket would send a reset
            # that can destroy this answer before the client reads it. Half-close instead,
            # drop what still arrives (data_received ignores it), close after _LINGER_S.
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()
        logger.info("connection refused: %d %s", err.status, err.code)


def raise_fd_limit() -> int:
    """Raise this process's soft file-descriptor limit to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the file-descriptor limit from %d: %s", soft, exc)
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """MAX_CONNECTIONS, or fewer when the file descriptors cannot hold them (logged)."""
    room = max(16, fd_limit - FD_RESERVE)
    cap = min(settings.max_connections, room)
    if cap < settings.max_connections:
        logger.warning(
            "file descriptors: limit %d, so at most %d connections (MAX_CONNECTIONS is %d)",
            fd_limit, cap, settings.max_connections,
        )  # fmt: skip
    else:
        logger.info("file descriptors: limit %d; connections capped at %d", fd_limit, cap)
    return cap


def guarded_protocol(settings: Settings, cap: int | None = None) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this deployment's limits."""
    limits = {
        "max_header_bytes": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "head_timeout_s": settings.client_head_timeout_s,
        "body_timeout_s": settings.client_body_timeout_s,
        "connection_cap": cap or settings.max_connections,
        "open_connections": {},
    }
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), limits)
