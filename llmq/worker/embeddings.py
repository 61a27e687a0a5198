"""Embedding jobs into the engine: the jobs that wait together, in one engine request.

An embedding request is one forward pass, and a small one costs the engine's HTTP server
and scheduler about as much as its model: sent one job per request, 1-input jobs spend
most of the engine's time outside the model. So a worker's embedding jobs of the same
model and options are merged: a job hands its inputs to the ``Embedder``; while fewer than
``IN_FLIGHT`` engine requests of that kind are out, they go at once (no added latency at
low load); otherwise they wait for the next free sender, which takes every input that
has gathered meanwhile (up to EMBED_BATCH_MAX_INPUTS) in one request, then hands each job
its vectors. Under load the merged requests grow to what arrived during one engine
round trip, as the outbox's flushes do.

What merging changes for a job, and how each is kept whole:
  - a refusal (4xx: an input too long for the model, a token id outside its vocabulary)
    of a merged request says nothing of which job caused it: each of its jobs is sent
    again alone, so only the job at fault gets the error;
  - the engine counts one request's tokens, not each input's: a job that shared a request
    gets its share of that exact total, in proportion to its inputs' estimated tokens
    (``shared.embeddings.split_tokens``); the totals (the keys' buckets, the metrics) stay
    exact, and a job that went alone gets the engine's own count;
  - a job that is cancelled (its client left, REQUEST_TIMEOUT_S) leaves its place: its
    inputs are not sent if they were still waiting, and a request already out serves the
    others.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram

from llmq.shared.embeddings import estimate_tokens, split_tokens
from llmq.shared.errors import ServiceError, UpstreamError
from llmq.shared.protocol import Api
from llmq.worker.engine import EngineClient

logger = logging.getLogger(__name__)

# Engine requests of one model and options out at once: while one computes, the next is
# sent (the engine never idles between them), and what arrives meanwhile gathers.
IN_FLIGHT = 2
# Client-side fields that do not reach the engine (they would keep jobs from merging).
_CLIENT_FIELDS = ("input", "encoding_format", "user")

Vectors = tuple[list[str], int]  # one job's vectors (base64) and its prompt tokens


@dataclass
class _Waiting:
    inputs: list[Any]
    weight: int  # its estimated tokens: its share of a merged request's count
    answer: asyncio.Future[Vectors]


@dataclass
class _Kind:
    """Jobs that can share an engine request: one model, the same options, the same sort
    of input (strings or token ids: one request holds one sort)."""

    options: dict[str, Any]
    waiting: list[_Waiting] = field(default_factory=list)
    senders: int = 0


class Embedder:
    def __init__(
        self,
        engine: EngineClient,
        max_inputs: int,
        in_flight: int = IN_FLIGHT,
        sizes: Histogram | None = None,
    ) -> None:
        self._engine = engine
        self._max_inputs = max_inputs
        self._in_flight = in_flight
        self._sizes = sizes  # jobs per engine request (worker_embedding_request_jobs)
        self._kinds: dict[str, _Kind] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0  # engine requests sent (for tests and the benchmark)

    async def embed(self, body: dict[str, Any]) -> Vectors:
        """The vectors (base64, in input order) and prompt tokens of one job's ``body``
        (``shared.embeddings.to_job_spec``); raises the engine's error."""
        inputs = list(body["input"])
        options = {k: v for k, v in body.items() if k not in _CLIENT_FIELDS}
        options["encoding_format"] = "base64"  # a quarter of JSON floats; never parsed here
        key = json.dumps([options, isinstance(inputs[0], str)], sort_keys=True)
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = _Kind(options)
        waiting = _Waiting(
            inputs, estimate_tokens(inputs), asyncio.get_running_loop().create_future()
        )
        kind.waiting.append(waiting)
        if kind.senders < self._in_flight:
            kind.senders += 1
            task = asyncio.create_task(self._send(key, kind), name="embed-sender")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await waiting.answer

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _take(self, kind: _Kind) -> list[_Waiting]:
        """The next request's jobs: those still waiting for an answer, in arrival order, up
        to max_inputs inputs (a job larger than that goes alone)."""
        taken: list[_Waiting] = []
        count = 0
        while kind.waiting:
            job = kind.waiting[0]
            if job.answer.done():  # cancelled while it waited
                kind.waiting.pop(0)
                continue
            if taken and count + len(job.inputs) > self._max_inputs:
                break
            taken.append(kind.waiting.pop(0))
            count += len(job.inputs)
        return taken

    async def _send(self, key: str, kind: _Kind) -> None:
        try:
            while batch := self._take(kind):
                await self._request(kind.options, batch)
        finally:
            kind.senders -= 1
            if not kind.senders and not kind.waiting:
                self._kinds.pop(key, None)

    async def _request(self, options: dict[str, Any], batch: list[_Waiting]) -> None:
        inputs = [x for job in batch for x in job.inputs]
        self.requests += 1
        if self._sizes is not None:
            self._sizes.observe(len(batch))
        try:
            result = await self._engine.complete({**options, "input": inputs}, Api.EMBEDDINGS)
            vectors = [d["embedding"] for d in sorted(result["data"], key=lambda d: d["index"])]
            total = int((result.get("usage") or {}).get("prompt_tokens") or 0)
            if len(vectors) != len(inputs):
                raise ServiceError(f"the engine returned {len(vectors)} vectors for {len(inputs)}")
        except UpstreamError as exc:
            if len(batch) > 1 and exc.status < 500:  # whose input was refused? each alone
                await asyncio.gather(*(self._request(options, [job]) for job in batch))
                return
            _fail(batch, exc)
            return
        except (ServiceError, ValueError, KeyError, TypeError) as exc:
            _fail(batch, exc if isinstance(exc, ServiceError) else ServiceError(repr(exc)))
            return
        except BaseException as exc:  # cancelled (the worker stops), or a bug
            _fail(batch, ServiceError(f"the embedding request failed: {exc!r}"))
            raise
        at = 0
        for job, tokens in zip(batch, split_tokens(total, [j.weight for j in batch]), strict=True):
            n = len(job.inputs)
            if not job.answer.done():
                job.answer.set_result((vectors[at : at + n], tokens))
            at += n


def _fail(batch: list[_Waiting], exc: ServiceError) -> None:
    for job in batch:
        if not job.answer.done():
            job.answer.set_exception(exc)
