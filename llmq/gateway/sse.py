"""The SSE response of a streamed request: frames the relay built, written as they come.

A stream's body (``JobRelay.sse_body``) yields finished SSE bytes (``id:``/``data:`` frames,
keep-alive comments), several frames per write under load. This response writes them in
the request's own task:

- the client leaving is noticed by one waiter on ``receive()`` (uvicorn answers
  ``http.disconnect``), whose completion cancels that task: the body's ``finally`` then
  cancels the job, as when the stream ends early for any reason;
- a write the client does not take within ``send_timeout_s`` (CLIENT_SEND_TIMEOUT_S: it
  stopped reading and the socket's buffers are full) ends the stream the same way;
- keep-alive comments are the body's (it yields one when nothing came for ``PING_S``);
- at shutdown, streams still open when the drain ends are cancelled by uvicorn
  (``timeout_graceful_shutdown``).

Not sse-starlette's ``EventSourceResponse``: per stream it runs a task group of four tasks
(the body, a ping loop, a disconnect listener, a shutdown listener) and wraps every send in
an anyio cancel scope and a lock: without them the gateway spent 4.2 instead of 4.8 CPU-ms
per 64-token stream at 64 concurrent streams (``python -m bench.scale``, alternated runs).
Its other features (event objects, separators, shutdown grace) are not used here: frames
come ready-made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

PING_S = 15.0  # a quiet stream gets a comment this often (proxies close silent connections)
PING = b": ping\n\n"


async def wait_disconnect(receive: Receive) -> None:
    """Until the client leaves (uvicorn's ``receive`` answers ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        send_timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.body_iterator = body
        self.send_timeout_s = send_timeout_s
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"left": False, "ending": False}

        def on_disconnect(watcher: asyncio.Future[None]) -> None:
            if not watcher.cancelled() and not state["ending"]:
                state["left"] = True
                task.cancel()

        watcher = asyncio.ensure_future(wait_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            async for chunk in self.body_iterator:
                message = {"type": "http.response.body", "body": chunk, "more_body": True}
                if self.send_timeout_s is None:
                    await send(message)
                    continue
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            state["ending"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            logger.info("a client read nothing for %ss: its stream ends", self.send_timeout_s)
        except asyncio.CancelledError:
            if state["left"] and task.uncancel() == 0:
                return  # the client left: nothing more to say to it
            raise
        finally:
            state["ending"] = True
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # the body's cleanup (the relay cancels an unfinished job)
