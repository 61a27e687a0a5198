"""A streamed answer: sse-starlette's ``EventSourceResponse``, configured for the relay.

The relay (``JobRelay.sse_body``) yields finished SSE bytes (``id:``/``data:`` frames,
several per write under load); sse-starlette writes bytes as they are (``ensure_bytes``), so
the frames go out exactly as the relay coalesced them. Its own options do the rest:

- ``ping=SSE_PING_S``: its ping task sends ``: ping`` when due (proxies close silent
  connections);
- ``send_timeout=CLIENT_SEND_TIMEOUT_S``: a write the client does not take in time (it
  stopped reading, the socket's buffers are full) raises ``SendTimeoutError`` after the
  body's ``aclose`` ran (the relay's ``finally`` cancels the job); ``RelayStream`` answers it
  with a log line instead of an ASGI error;
- the client leaving: its disconnect listener ends the task group, which cancels the body
  at its ``await``: the same ``finally`` cancels the job. Before a stream starts, the route
  waits with ``wait_disconnect`` (``relay.until_disconnect``), the same wait for the same
  message;
- shutdown: sse-starlette replaces uvicorn's ``Server.handle_exit`` at import with a patch
  that ends every stream at the first signal. ``server.DrainingServer`` overrides
  ``handle_exit``, so that patch never runs for it; streams end when the drain sets the
  server's ``should_exit``, which sse-starlette's watcher reads from the server it finds
  through the signal handler. ``SSE_SEAM`` pins each of those private members.

It costs more CPU than writing the frames in the request's own task (per stream, a task
group of four tasks and a lock around each send): measured with ``python -m bench.scale``
at c = 64 in alternated runs (ARCHITECTURE.md, "The token path and its cost"), within the
run-to-run noise, so the maintained library is used.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette import sse as sse_module
from starlette.types import Receive, Scope, Send

from llmq.shared import seams
from llmq.shared.seams import Pin
from llmq.shared.settings import Settings

logger = logging.getLogger(__name__)

# What this module and server.DrainingServer rely on (shared.seams), pinned against
# sse-starlette 3.7.0-3.7.1 (pyproject: <3.8). After an upgrade, read each member's new source,
# adapt, re-pin.
SSE_SEAM: dict[str, Pin] = {
    "AppStatus.original_handler": Pin(
        "(self, sig: 'int', frame: 'FrameType | None') -> 'None'",
        "553276efa26e09ea84b4626425f1d03647f1b043084f5a42994f3ae7e0d1aa1e",
        "uvicorn's own handle_exit, which DrainingServer.handle_exit replaces",
    ),
    "AppStatus.handle_exit": Pin(
        "(*args, **kwargs)",
        "c8ecef358e55d8feeeb199f7e960fff97573ee02db4a2132baf67927498279e6",
        "sse-starlette's patch, bypassed: it would end every stream at the first signal",
    ),
    "_shutdown_watcher": Pin(
        "() -> None",
        "69b2f44696c5ee5ede199b04ab0cb57fa3f71e379d4189496403d4f7c1370c76",
        "ends open streams once the server's should_exit is set (the drain's end)",
    ),
    "_get_uvicorn_server": Pin(
        "()",
        "f4fed20755d96e463838e481adaf04d2747e92befb42a07db06dd50b3bfa4774",
        "finds the server through its signal handler: ours",
    ),
    "EventSourceResponse._stream_response": Pin(
        "(self, send: collections.abc.Callable[[collections.abc.MutableMapping[str, typing.Any]],"
        " collections.abc.Awaitable[None]]) -> None",
        "0abe0f2254265d7dd9777efad10b77606214ddbe7cef5c6af44db36587c6e133",
        "writes each yielded chunk as it is; closes the body (the relay's cleanup) before a "
        "failed send's error escapes",
    ),
    "EventSourceResponse._listen_for_disconnect": Pin(
        "(self, receive: collections.abc.Callable[[], collections.abc.Awaitable[collections.abc."
        "MutableMapping[str, typing.Any]]]) -> None",
        "9d0829e9fd4621cdb767fcdbfdecf4d9640490d1ca98fe92b17ad43cbb6c9b80",
        "the client leaving ends the task group, which cancels the body (the job is cancelled)",
    ),
    "SendTimeoutError": Pin(
        None,
        "39fe924520fdaf82fffea5eddd6cf2ab0d6acc87a7b7e8a06c0264a53ee354e8",
        "what a send the client did not take raises (RelayStream catches it)",
    ),
}


def seam_problems(check_source: bool = True) -> list[str]:
    """What no longer matches between ``SSE_SEAM`` and the installed sse-starlette."""
    return seams.seam_problems(
        sse_module, SSE_SEAM, library="sse-starlette", check_source=check_source
    )


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")  # b": ping\n\n"


class RelayStream(EventSourceResponse):
    """``EventSourceResponse`` whose stalled client ends its stream with a log line."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except sse_module.SendTimeoutError:
            # The body was closed first (the job cancelled): only the socket is left,
            # which uvicorn closes when this returns without completing the response.
            logger.info("a client read nothing for %ss: its stream ends", self.send_timeout)


def stream(body: AsyncIterator[bytes], settings: Settings) -> RelayStream:
    """The streamed answer of ``body`` (finished SSE frames, as bytes)."""
    return RelayStream(
        body,
        headers={"Cache-Control": "no-cache"},
        ping=settings.sse_ping_s,
        sep="\n",
        ping_message_factory=_ping,
        send_timeout=settings.client_send_timeout_s,
    )


async def wait_disconnect(receive: Receive) -> None:
    """Until the client leaves (uvicorn's ``receive`` answers ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass
