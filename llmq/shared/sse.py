"""Reading the OpenAI flavour of server-sent events: ``data: <json>`` lines up to ``[DONE]``.

One parser for every reader of such a stream: the worker reading the engine (``data``,
bytes in, bytes out: no decoding per token), and the load generator and tests reading the
gateway (``events``). Only ``data:`` fields matter in this API (the gateway's ``id:`` and
comment lines are skipped); each event holds one ``data:`` line.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

DONE = "[DONE]"
_DONE = b"[DONE]"


class StreamEndedEarly(Exception):
    """The stream closed without ``data: [DONE]``."""


async def events(lines: AsyncIterable[str]) -> AsyncIterator[dict[str, Any]]:
    """Yield each event's JSON object until ``data: [DONE]``; raise ``StreamEndedEarly``
    if the lines end before it. Non-object payloads are a protocol error (ValueError)."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == DONE:
            return
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError(f"SSE data is not a JSON object: {data[:80]!r}")
        yield obj
    raise StreamEndedEarly


async def data(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's ``data:`` payload (stripped bytes) until ``data: [DONE]``; raise
    ``StreamEndedEarly`` if the stream ends before it. Accepts any chunking of the bytes."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == _DONE:
                return
            yield payload
    raise StreamEndedEarly
