"""Engine client: the OpenAI HTTP API that vLLM (and bench.engine_sim) speak, over aiohttp.

Closing the response stream is how a request is aborted inside vLLM, so a cancelled job
only has to leave the ``async with`` block.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from opentelemetry.instrumentation.aiohttp_client import create_trace_config

from llmq.shared import sse, tracing
from llmq.shared.errors import EngineUnavailable, UpstreamError
from llmq.shared.protocol import Api, Band, JobSpec, ModelCard, ModelKind
from llmq.shared.settings import ENGINE_PROBE_TIMEOUT_S

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 64 * 1024
_DRAIN_S = 1.0  # an engine that keeps the response open after [DONE] gets this long
_TOOLS_PROBE_S = 60.0  # one token; a CPU engine's first request can take a while
# vLLM's refusal of tool_choice "auto" names the flag it lacks.
_AUTO_TOOLS_FLAG = b"--enable-auto-tool-choice"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe",
        "description": "not called: only asks the engine whether it takes tools",
        "parameters": {"type": "object", "properties": {}},
    },
}


# vLLM's `priority`: lower is scheduled earlier (ties first come, first served).
BAND_PRIORITY = {Band.HIGH: 0, Band.NORMAL: 1, Band.LOW: 2}


def engine_body(spec: JobSpec, priority: bool, stream_interval: int = 1) -> dict[str, Any]:
    """What the engine is sent for ``spec``: its body, with the band as vLLM's ``priority``
    when ENGINE_PRIORITY is on, and ``stream_interval`` (tokens per streamed delta; vLLM
    sends the first token at once, then one delta per that many) when above 1. Clients
    cannot send either: neither is passed through."""
    extra: dict[str, Any] = {}
    if priority:
        extra["priority"] = BAND_PRIORITY[spec.band]
    if stream_interval > 1 and spec.stream:
        extra["stream_interval"] = stream_interval
    return {**spec.body, **extra} if extra else spec.body


def engine_api(spec: JobSpec) -> Api:
    """The engine route a job's body goes to: a Responses job is a chat job there."""
    return Api.CHAT if spec.api is Api.RESPONSES else spec.api


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
    """One aiohttp session per worker (made on first use, inside the event loop).

    aiohttp rather than httpx here: reading a streamed response cost 4-5x less CPU per
    stream with aiohttp (measured: 1.2-1.5 vs 5.4-7.1 ms per 64-token stream at 64
    concurrent streams), and this read happens once per token of every job.
    """

    def __init__(self, base_url: str, *, max_connections: int, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._chat = self.base_url + Api.CHAT.path
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._limit = max_connections + 4
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # With tracing on, each engine request is a span of the job's trace and sends
            # its traceparent (the probes run under tracing.quiet: no span).
            traced = [create_trace_config()] if tracing.enabled() else []
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                trace_configs=traced,
                connector=aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=30),
                # Generation time is bounded by REQUEST_TIMEOUT_S in the job, not here.
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0),
                raise_for_status=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def models(self) -> list[ModelCard] | None:
        """Served models (base models, extra served names, LoRA adapters), or None when the
        engine does not answer (not ready)."""
        try:
            async with self._http().get(
                self.base_url + "/v1/models",
                timeout=aiohttp.ClientTimeout(total=ENGINE_PROBE_TIMEOUT_S),
            ) as resp:
                resp.raise_for_status()
                data = json.loads(await resp.read())
            return [ModelCard.from_engine(m) for m in data.get("data", [])]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            logger.debug("engine probe failed: %r", exc)
            return None

    async def metrics_text(self) -> str | None:
        """The engine's Prometheus text (``/metrics``), or None when it does not answer."""
        try:
            async with self._http().get(
                self.base_url + "/metrics",
                timeout=aiohttp.ClientTimeout(total=ENGINE_PROBE_TIMEOUT_S),
            ) as resp:
                resp.raise_for_status()
                return (await resp.read()).decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("engine metrics failed: %r", exc)
            return None

    async def healthy(self) -> bool:
        """Whether the engine's ``/health`` answers 200 (vLLM's fails once its engine
        core is dead, while its HTTP server may still answer other routes)."""
        try:
            async with self._http().get(
                self.base_url + "/health",
                timeout=aiohttp.ClientTimeout(total=ENGINE_PROBE_TIMEOUT_S),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("engine health check failed: %r", exc)
            return False

    async def count_tokens(self, body: dict[str, Any]) -> int:
        """The tokens of a prompt as the engine renders it: vLLM's ``/tokenize`` (chat
        ``messages`` with its template flags, or a completions ``prompt``). Raises
        EngineUnavailable or UpstreamError."""
        try:
            async with self._http().post(
                self.base_url + "/tokenize",
                json=body,
                timeout=aiohttp.ClientTimeout(total=_TOOLS_PROBE_S),
            ) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        if resp.status != 200:
            raise _upstream_error(resp.status, raw[:_MAX_ERROR_BODY])
        return int(json.loads(raw)["count"])

    async def auto_tools(self, model: str) -> bool | None:
        """Whether the engine takes ``tools`` with ``tool_choice: "auto"`` (vLLM does only
        when started with ``--enable-auto-tool-choice --tool-call-parser ...``): one
        request of one token. None when the answer says nothing either way."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [_PROBE_TOOL],
            "tool_choice": "auto",
            "max_tokens": 1,
            "stream": False,
        }
        try:
            async with self._http().post(
                self._chat,
                json=body,
                headers={"X-LLMQ-Probe": "tools"},  # says what it is (engines ignore it)
                timeout=aiohttp.ClientTimeout(total=_TOOLS_PROBE_S),
            ) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("tools probe failed: %r", exc)
            return None
        if resp.status == 200:
            return True
        if resp.status == 400 and _AUTO_TOOLS_FLAG in raw:
            return False
        return None

    async def kind(self, model: str) -> ModelCard | None:
        """What ``model`` is, from the engine's answers (vLLM's /v1/models does not say):
        one embedding of a word. 200: an embedding model (its vector's length; then a
        second request asks for that length as ``dimensions``, which only a Matryoshka
        model takes); 404 (no such route for this model: vLLM's generate runner, or an
        engine without embeddings): a generative model. None when the answer says neither
        (asked again at the next probe)."""
        body: dict[str, Any] = {"model": model, "input": "probe", "encoding_format": "base64"}
        answer = await self._probe(Api.EMBEDDINGS.path, body)
        if answer is None:
            return None
        status, raw = answer
        if status in (404, 405):
            return ModelCard(id=model, kind=ModelKind.GENERATE)
        if status != 200:
            return None
        try:
            length = len(base64.b64decode(json.loads(raw)["data"][0]["embedding"])) // 4
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        again = await self._probe(Api.EMBEDDINGS.path, {**body, "dimensions": length})
        return ModelCard(
            id=model,
            kind=ModelKind.EMBED,
            dimensions=length,
            matryoshka=again is not None and again[0] == 200,
        )

    async def _probe(self, path: str, body: dict[str, Any]) -> tuple[int, bytes] | None:
        try:
            async with self._http().post(
                self.base_url + path,
                json=body,
                headers={"X-LLMQ-Probe": "kind"},
                timeout=aiohttp.ClientTimeout(total=_TOOLS_PROBE_S),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("kind probe failed: %r", exc)
            return None

    async def complete(self, body: dict[str, Any], api: Api = Api.CHAT) -> dict[str, Any]:
        """``stream=false``: one answer (a chat.completion, a text completion, an
        embeddings list) of the engine's route for ``api``."""
        url = self._chat if api is Api.CHAT else self.base_url + api.path
        try:
            async with self._http().post(url, json=body) as resp:
                raw = await resp.read()
        except aiohttp.ClientError as exc:  # unreachable, or gone before its answer ended
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        if resp.status != 200:
            raise _upstream_error(resp.status, raw[:_MAX_ERROR_BODY])
        result: dict[str, Any] = json.loads(raw)
        return result

    @asynccontextmanager
    async def stream(
        self, body: dict[str, Any], api: Api = Api.CHAT
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """``stream=true`` (chat or completions): yields an iterator of the chunks' JSON
        text, as bytes (parsed by the caller only when it must); raises before yielding
        when the engine refuses the request (its status and message kept). Leaving the
        block early closes the connection, which aborts the request inside vLLM."""
        url = self._chat if api is Api.CHAT else self.base_url + api.path
        try:
            resp = await self._http().post(url, json=body)
        except aiohttp.ClientConnectionError as exc:
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        try:
            if resp.status != 200:
                raw = b""
                async for part in resp.content.iter_any():
                    raw += part
                    if len(raw) > _MAX_ERROR_BODY:
                        break
                raise _upstream_error(resp.status, raw)
            yield _chunks(resp)
        finally:
            resp.release()  # back to the pool if read to its end, else closed


def refuses_auto_tools(err: UpstreamError) -> bool:
    """The engine's refusal of tool_choice "auto" (started without a tool-call parser)."""
    return err.status == 400 and _AUTO_TOOLS_FLAG.decode() in err.message


def stream_error(obj: dict[str, Any]) -> UpstreamError | None:
    """vLLM reports a failure after the first byte as a chunk ``{"error": {...}}``."""
    err = obj.get("error")
    if not isinstance(err, dict):
        return None
    code = str(err.get("code") or "")
    return UpstreamError(
        int(code) if code.isdigit() else 500, str(err.get("message", "engine error"))
    )


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    body = resp.content.iter_any()
    try:
        async for payload in sse.data(body):
            if payload.startswith(b'{"error"'):
                err = stream_error(json.loads(payload))
                if err is not None:
                    raise err
            yield payload
        # Read the body to its end (after [DONE] only the chunked terminator is left), so
        # the connection goes back to the pool instead of being closed: a new TCP
        # connection per job cost more CPU than the job's whole SSE parsing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_S):
                async for _ in body:
                    pass
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            502, f"engine stream broke off: {exc!r}", code="engine_stream_broken"
        ) from exc
    except sse.StreamEndedEarly:
        raise UpstreamError(
            502, "engine stream ended without [DONE]", code="engine_stream_broken"
        ) from None
