"""OpenAI's legacy completions request (``POST /v1/completions``) and the job it becomes.

A completions job runs as a chat job does (the same queue, slots, relay and events), on
the engine's ``/v1/completions``: its chunks are ``text_completion`` objects, relabelled
with the job's id like chat's. Fields the gateway does not read pass through under the
same allow-list as chat's (PASSTHROUGH_FIELDS), with the completions-only ones here.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmq.shared.chat import StreamOptions, engine_request
from llmq.shared.protocol import ANONYMOUS, Api, Band, JobSpec

# OpenAI's and vLLM's default max_tokens for a completion (when the request sets none).
DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 2048
# Completions-only fields passed on to the engine (vLLM takes each; an engine that does not
# answers with its own 400): the prompt echoed before the completion, text after it.
FIELDS = frozenset({"echo", "suffix", "best_of", "prompt_logprobs", "add_special_tokens"})


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` body. ``logprobs`` is an integer here (top log
    probabilities per token, OpenAI's 0..5), unlike chat's boolean."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    service_tier: str | None = Field(None, max_length=32)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty array")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"prompt holds {len(value)} prompts; at most {MAX_PROMPTS}")
        return value

    # What ``gateway.body.check_max_tokens`` reads of a chat request.
    @property
    def max_completion_tokens(self) -> int | None:
        return None

    def chars(self) -> int:
        p = self.prompt
        if isinstance(p, str):
            return len(p)
        if isinstance(p[0], str):
            return sum(len(x) for x in p)
        if isinstance(p[0], int):
            return 4 * len(p)
        return 4 * sum(len(x) for x in p)

    def prompts(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)


def new_job_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def estimate_tokens(req: CompletionRequest) -> int:
    """As chat's: the prompt's characters / 4, plus what each choice of each prompt may
    generate (DEFAULT_MAX_TOKENS when the request sets no max_tokens)."""
    return req.chars() // 4 + (req.max_tokens or DEFAULT_MAX_TOKENS) * req.n * req.prompts()


def to_job_spec(
    req: CompletionRequest,
    job_id: str,
    *,
    tenant: str = ANONYMOUS,
    band: Band = Band.NORMAL,
    tpm: int = 0,
) -> JobSpec:
    """As ``shared.chat.to_job_spec`` (``engine_request``: a stream asks for its usage)."""
    return JobSpec(
        id=job_id,
        model=req.model,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        body=engine_request(req, req.stream, req.stream_options),
        enqueued_at_ms=int(time.time() * 1000),
        tenant=tenant,
        band=band,
        tpm=tpm,
        token_estimate=estimate_tokens(req) if tpm else 0,
        api=Api.COMPLETIONS,
    )
