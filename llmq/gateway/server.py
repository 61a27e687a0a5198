"""uvicorn with a drain: SIGTERM -> 503 for new requests, finish admitted ones, then exit.

uvicorn's own SIGTERM handling stops accepting connections at once, so a load balancer's
next request would be refused rather than answered 503; and sse-starlette ends open streams
as soon as uvicorn's ``should_exit`` is set. Here the first SIGTERM/SIGINT only flips the
app into draining; ``should_exit`` is set when no request is in flight any more, or after
DRAIN_TIMEOUT_S. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from sse_starlette import sse

from llmq.gateway.state import GatewayState
from llmq.shared import seams
from llmq.shared.seams import Pin

logger = logging.getLogger(__name__)

# What this module overrides or relies on (shared.seams): uvicorn's Server, pinned against
# uvicorn 0.54.0 (pyproject: <0.55), and sse-starlette's shutdown hook, against 3.7.0
# (pyproject: <3.8). sse-starlette replaces uvicorn's Server.handle_exit at import with its
# own, which ends every open stream at the first signal; DrainingServer overrides
# handle_exit, so that patch never runs for it, and streams end only when the drain sets
# should_exit, which sse-starlette's watcher reads from the server it finds through the
# signal handler. After an upgrade, read the new source of each member, adapt, re-pin.
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
}


def seam_problems(check_source: bool = True) -> list[str]:
    """What no longer matches between these pins and the installed uvicorn/sse-starlette."""
    return seams.seam_problems(
        uvicorn.Server, UVICORN_SERVER_SEAM, library="uvicorn", check_source=check_source
    ) + seams.seam_problems(sse, SSE_SEAM, library="sse-starlette", check_source=check_source)


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
