"""Logging set-up shared by both processes."""

from __future__ import annotations

import logging

# Libraries that log request or response content at DEBUG (sse-starlette logs every SSE
# chunk it sends: completions), or one line per engine probe at INFO (httpx). They stay at
# WARNING whatever LOG_LEVEL says: prompts and completions are never logged.
_QUIET = ("sse_starlette", "httpx", "httpcore", "hpack", "multipart", "aiohttp")


def configure(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
