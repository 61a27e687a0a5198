"""OpenAI chat-completion request model, and its conversion to a validated ``JobSpec``.

Only the fields the service acts on are validated; every other field is kept as sent and
passed through to the engine (vLLM knows many sampling extensions the gateway need not).
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from llmq.shared.protocol import ANONYMOUS, Band, JobSpec


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


# OpenAI's metadata: up to 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=64)],
        Annotated[str, StringConstraints(max_length=512)],
    ],
    Field(max_length=16),
]


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. Other fields are kept (``extra="allow"``); the
    gateway then refuses those outside its pass-through allow-list (gateway.body)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    service_tier: str | None = Field(None, max_length=32)
    store: bool = False  # keep the completion STORE_TTL_S: retrievable, resumable, detached
    metadata: Metadata | None = None  # OpenAI's tags of a stored completion (listing filter)


def new_job_id() -> str:
    """OpenAI-style id: returned as the response ``id`` and the ``x-request-id`` header."""
    return "chatcmpl-" + secrets.token_hex(12)


def estimate_tokens(req: ChatCompletionRequest) -> int:
    """Tokens a request will cost, for the tenant's tokens-per-minute bucket at admission:
    about four characters a token for the prompt, plus the completion cap when one is set.
    The worker corrects the bucket with the exact usage when the job ends."""
    chars = sum(len(str(m.content or "")) for m in req.messages)
    cap = req.max_completion_tokens or req.max_tokens or 0
    return chars // 4 + 4 * len(req.messages) + cap * req.n


def band_for(service_tier: str | None, key_band: Band) -> Band:
    """OpenAI's ``service_tier: "flex"`` lowers a request to the low band; nothing raises
    it above its key's band."""
    return key_band.lowered_to(Band.LOW) if service_tier == "flex" else key_band


def to_job_spec(
    req: ChatCompletionRequest,
    job_id: str,
    *,
    tenant: str = ANONYMOUS,
    band: Band = Band.NORMAL,
    tpm: int = 0,
    store: bool = False,
) -> JobSpec:
    """Freeze a validated request into the job the worker runs.

    The engine is always asked to stream with ``include_usage`` when the client streams, so
    token counts are exact; whether the client sees the usage chunk is the gateway's call.
    ``service_tier`` is the gateway's (it picked the band) and is not passed on, nor is
    ``store`` (``store`` here: the request's, or implied by an Idempotency-Key).
    """
    body = engine_request(req, req.stream, req.stream_options)
    body.pop("store", None)  # the gateway's: stored here, not by the engine
    return JobSpec(
        id=job_id,
        model=req.model,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        body=body,
        enqueued_at_ms=int(time.time() * 1000),
        tenant=tenant,
        band=band,
        tpm=tpm,
        token_estimate=estimate_tokens(req) if tpm else 0,
        stored=store or req.store,
    )


def engine_request(
    req: BaseModel, stream: bool, stream_options: StreamOptions | None
) -> dict[str, Any]:
    """A generation request as its engine gets it (chat's and legacy completions'): the
    fields sent, without the gateway's ``service_tier``; a stream always asks for its usage
    (``stream_options.include_usage``: exact token counts), whatever the client asked."""
    body = req.model_dump(mode="json", exclude_unset=True)
    body.pop("service_tier", None)
    if stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    body["stream"] = stream
    return body
