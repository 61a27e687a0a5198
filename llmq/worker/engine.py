"""Engine client: the OpenAI HTTP API that vLLM (and bench.engine_sim) speak, over httpx.

Closing the response stream is how a request is aborted inside vLLM, so a cancelled job
only has to leave the ``async with`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from llmq.shared import sse
from llmq.shared.errors import EngineUnavailable, UpstreamError
from llmq.shared.settings import ENGINE_PROBE_TIMEOUT_S

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 64 * 1024
_DRAIN_S = 1.0  # an engine that keeps the response open after [DONE] gets this long


def _upstream_error(status: int, raw: bytes) -> UpstreamError:
    """vLLM's error body (new ``{"error": {...}}`` or old flat shape) -> UpstreamError."""
    message, etype, param = (
        raw[:2000].decode(errors="replace") or f"engine status {status}",
        None,
        None,
    )
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message", message))
            etype = err.get("type")
            param = err.get("param")
    except ValueError:
        pass
    return UpstreamError(
        status, message, error_type=str(etype or "upstream_error"), code=status, param=param
    )


class EngineClient:
    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            # Generation time is bounded by REQUEST_TIMEOUT_S in the job, not by httpx.
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=10.0),
            limits=httpx.Limits(
                max_connections=max_connections + 4, max_keepalive_connections=max_connections + 4
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[tuple[str, int]] | None:
        """Served models as (id, max_model_len; 0 when not said), or None when the engine
        does not answer (not ready)."""
        try:
            resp = await self._http.get("/v1/models", timeout=ENGINE_PROBE_TIMEOUT_S)
            resp.raise_for_status()
            return [
                (m["id"], int(m.get("max_model_len") or 0)) for m in resp.json().get("data", [])
            ]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            logger.debug("engine probe failed: %s", exc)
            return None

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """``stream=false``: one chat.completion."""
        try:
            resp = await self._http.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        if resp.status_code != 200:
            raise _upstream_error(resp.status_code, resp.content[:_MAX_ERROR_BODY])
        result: dict[str, Any] = resp.json()
        return result

    @asynccontextmanager
    async def stream(self, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[bytes]]:
        """``stream=true``: yields an iterator of the chunks' JSON text, as bytes (parsed by
        the caller only when it must); raises before yielding when the engine refuses the
        request (its status and message kept)."""
        request = self._http.build_request("POST", "/v1/chat/completions", json=body)
        try:
            resp = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        try:
            if resp.status_code != 200:
                raw = b""
                async for part in resp.aiter_bytes():
                    raw += part
                    if len(raw) > _MAX_ERROR_BODY:
                        break
                raise _upstream_error(resp.status_code, raw)
            yield _chunks(resp)
        finally:
            await resp.aclose()


def stream_error(obj: dict[str, Any]) -> UpstreamError | None:
    """vLLM reports a failure after the first byte as a chunk ``{"error": {...}}``."""
    err = obj.get("error")
    if not isinstance(err, dict):
        return None
    code = str(err.get("code") or "")
    return UpstreamError(
        int(code) if code.isdigit() else 500, str(err.get("message", "engine error"))
    )


async def _chunks(resp: httpx.Response) -> AsyncIterator[bytes]:
    body = resp.aiter_bytes()
    try:
        async for payload in sse.data(body):
            if payload.startswith(b'{"error"'):
                err = stream_error(json.loads(payload))
                if err is not None:
                    raise err
            yield payload
        # Read the body to its end (after [DONE] only the chunked terminator is left), so
        # httpx returns the connection to its pool instead of closing it: a new TCP
        # connection per job cost more CPU than the job's whole SSE parsing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_S):
                async for _ in body:
                    pass
    except httpx.TransportError as exc:
        raise UpstreamError(
            502, f"engine stream broke off: {exc!r}", code="engine_stream_broken"
        ) from exc
    except sse.StreamEndedEarly:
        raise UpstreamError(
            502, "engine stream ended without [DONE]", code="engine_stream_broken"
        ) from None
