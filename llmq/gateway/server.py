"""uvicorn with a drain: SIGTERM -> 503 for new requests, finish admitted ones, then exit.

uvicorn's own SIGTERM handling stops accepting connections at once, so a load balancer's
next request would be refused rather than answered 503; and sse-starlette ends open streams
as soon as uvicorn's ``should_exit`` is set. Here the first SIGTERM/SIGINT only flips the
app into draining; ``should_exit`` is set when no request is in flight any more, or after
DRAIN_TIMEOUT_S (then sse-starlette ends the streams still open). A second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn

from llmq.gateway.state import GatewayState
from llmq.shared import seams
from llmq.shared.seams import Pin

logger = logging.getLogger(__name__)

# What this module overrides or relies on (shared.seams): uvicorn's Server, pinned against
# uvicorn 0.54.0 (pyproject: <0.55). sse-starlette replaces uvicorn's Server.handle_exit at
# import with its own (uvicorn's is then ``AppStatus.original_handler``, pinned in
# ``event_stream.SSE_SEAM``); DrainingServer overrides handle_exit, so neither runs for it.
# After an upgrade, read the new source of each member, adapt, re-pin.
UVICORN_SERVER_SEAM: dict[str, Pin] = {
    "__init__": Pin(
        "(self, config: 'Config') -> 'None'",
        "c150b55284f7511eba734c0219b897d3406fa0750c5f568f629673431e832187",
        "sets should_exit and force_exit, which handle_exit and the drain set",
    ),
    "serve": Pin(
        "(self, sockets: 'list[socket.socket] | None' = None) -> 'None'",
        "112ef41af52167e35ebf82b8570d4aec9e64bdc952ed3905abb562fad5320ee5",
        "overridden: records the running loop, then uvicorn's (which installs handle_exit)",
    ),
}


def seam_problems(check_source: bool = True) -> list[str]:
    """What no longer matches between these pins and the installed uvicorn."""
    return seams.seam_problems(
        uvicorn.Server, UVICORN_SERVER_SEAM, library="uvicorn", check_source=check_source
    )


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: GatewayState) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._state.draining or self._loop is None:
            self.force_exit = self._state.draining
            self.should_exit = True
            return
        self._state.draining = True
        logger.info(
            "signal %d: draining %d request(s), up to %.0fs",
            sig,
            self._state.active,
            self._state.settings.drain_timeout_s,
        )
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())
        self._drain_task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("drain failed; exiting now", exc_info=task.exception())
            self.should_exit = True

    async def _drain(self) -> None:
        deadline = time.monotonic() + self._state.settings.drain_timeout_s
        while self._state.active > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._state.active:
            logger.warning("drain timeout: %d request(s) still in flight", self._state.active)
        else:
            logger.info("drained; exiting")
        self.should_exit = True
