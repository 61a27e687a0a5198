"""OpenAI's embeddings request, the job it becomes, and the answer's wire format.

The gateway validates ``POST /v1/embeddings`` (``EmbeddingRequest``: OpenAI's limits,
before anything is queued) and freezes it into a job (``to_job_spec``, ``api``
embeddings, never streamed). Its worker sends the inputs to an engine serving the model
with vLLM's pooling runner, several jobs' inputs in one engine request when they wait
together (``worker.embeddings``), always asking for base64 vectors (little-endian float32,
a quarter of the bytes of JSON floats, and no float parsing); it writes the client's
answer (``answer``): floats or base64 as the client asked, in input order. The gateway
sends that answer as it is, reading only its usage (``usage_of``).
"""

from __future__ import annotations

import array
import base64
import json
import re
import secrets
import sys
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmq.shared.protocol import ANONYMOUS, Api, Band, JobSpec

MAX_INPUTS = 2048  # OpenAI's: inputs in one request
# OpenAI's: tokens summed over one request's inputs (here estimated as ``estimate_tokens``
# does: a string's characters / 4, a token-id input its length).
MAX_TOTAL_TOKENS = 300_000
# Fields vLLM's pooling runner takes besides OpenAI's (passed on as sent).
ENGINE_FIELDS = frozenset({"truncate_prompt_tokens"})

Input = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body: OpenAI's fields; another field is a 400 unless it is one
    of ``ENGINE_FIELDS`` or PASSTHROUGH_EXTRA (``gateway.embeddings``)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65_536)
    user: str | None = Field(None, max_length=256)

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        """OpenAI's four shapes, none of them empty; a mixed array is refused (pydantic
        would coerce it into one of the shapes)."""
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a non-empty string or a non-empty array")
        if all(_token_id(t) for t in value):
            return value  # one input of token ids
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input holds {len(value)} inputs; at most {MAX_INPUTS}")
        if all(isinstance(x, str) and x for x in value):
            return value
        if all(isinstance(x, list) and x and all(_token_id(t) for t in x) for x in value):
            return value
        raise ValueError(
            "input must be a string, an array of non-empty strings, an array of token ids "
            "(integers >= 0) or an array of such arrays, not a mix"
        )

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as one list (a single input: a list of one)."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]
        return self.input


def _token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def estimate_tokens(inputs: list[str] | list[list[int]]) -> int:
    """Tokens the inputs hold, for the key's tokens-per-minute bucket and the request's
    bound: a string's characters / 4 (at least 1), a token-id input its length. The
    worker corrects the bucket with the engine's count when the job ends."""
    return sum(len(x) if isinstance(x, list) else max(1, len(x) // 4) for x in inputs)


def new_job_id() -> str:
    """The job's id (``x-request-id``); an embeddings answer itself carries none."""
    return "embd-" + secrets.token_hex(12)


def to_job_spec(
    req: EmbeddingRequest,
    job_id: str,
    *,
    tenant: str = ANONYMOUS,
    band: Band = Band.NORMAL,
    tpm: int = 0,
) -> JobSpec:
    """The job the worker runs: the request as sent (``input`` normalised to one list);
    ``encoding_format`` is what the client gets, the engine is always asked for base64."""
    body = req.model_dump(mode="json", exclude_unset=True)
    body["input"] = req.inputs()
    body["encoding_format"] = req.encoding_format
    return JobSpec(
        id=job_id,
        model=req.model,
        stream=False,
        include_usage=False,
        body=body,
        enqueued_at_ms=int(time.time() * 1000),
        tenant=tenant,
        band=band,
        tpm=tpm,
        token_estimate=estimate_tokens(req.inputs()) if tpm else 0,
        api=Api.EMBEDDINGS,
    )


def floats(b64: str) -> list[float]:
    """A base64 vector (little-endian float32, OpenAI's and vLLM's) as floats."""
    vector = array.array("f", base64.b64decode(b64))
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host runs this
        vector.byteswap()
    return vector.tolist()


def answer(model: str, vectors: list[str], prompt_tokens: int, encoding: str) -> dict[str, Any]:
    """The client's answer from the engine's base64 vectors, in input order: OpenAI's
    ``list`` object (``usage`` first: see ``usage_of``)."""
    as_float = encoding == "float"
    data = [
        {"object": "embedding", "index": i, "embedding": floats(v) if as_float else v}
        for i, v in enumerate(vectors)
    ]
    out = {
        "object": "list",
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "model": model,
        "data": data,
    }
    return out


def encode(out: dict[str, Any]) -> bytes:
    """An ``answer`` as sent: compact JSON, ``usage`` first, so that ``usage_of`` reads it
    without parsing the vectors."""
    return json.dumps(out, separators=(",", ":")).encode()


_USAGE = re.compile(rb'^\{"object":"list","usage":(\{[^{}]*\})')


def usage_of(raw: bytes) -> dict[str, Any]:
    """The usage of an ``answer`` (its head only: the vectors may be megabytes)."""
    found = _USAGE.match(raw)
    return json.loads(found.group(1)) if found else {}


def split_tokens(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders: the parts add up
    to ``total`` exactly). The engine counts one request's tokens, not each input's: a
    request that shared an engine request with others gets its share of the exact total."""
    whole = sum(weights)
    if not weights:
        return []
    if whole <= 0:
        weights, whole = [1] * len(weights), len(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
