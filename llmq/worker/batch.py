"""The worker's part of the Batch API: running one batch request, and feeding batches.

A batch request is an ordinary job in the lowest band of its line's model (so a free slot
always goes to an interactive job first, and one waits at most for one job to end), run
without a client: its answer becomes one line of the batch's results. Batch jobs are not
admitted through the bound: they never count toward QUEUE_MAX or wait under QUEUE_TIMEOUT_S
(their job key lives until the batch's window ends).

Lines are fed for idle slots: a worker whose free slots found no waiting job feeds that many
lines at once (``BatchFeeder.fill``, from the worker's turn: woken, not polled) and picks
them, so a batch fills a model's idle capacity and never floods the queue; the batch's
``max_inflight`` (BATCH_MAX_INFLIGHT, or its key's max_concurrent) bounds its requests
queued or running. The feed script enqueues a batch's next lines only if nobody fed them
first, so several workers enqueue each line once. Every worker also ticks each BATCH_FEED_S
for the rest of a batch's life: expiry, taking back an ending batch's queued lines,
finalizing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from llmq.shared import completions, embeddings
from llmq.shared import protocol as p
from llmq.shared.chat import ChatCompletionRequest, to_job_spec
from llmq.shared.completions import CompletionRequest
from llmq.shared.embeddings import EmbeddingRequest
from llmq.shared.errors import (
    PayloadUndecryptable,
    ServiceError,
    UpstreamError,
    WrongModelKind,
)
from llmq.shared.queue import names
from llmq.shared.queue.batch_records import BatchRecord, BatchStatus, failure_line, output_line
from llmq.shared.queue.batches import BatchStore
from llmq.shared.responses.events import from_completion
from llmq.shared.responses.request import ECHO_KEY, batch_body
from llmq.worker.engine import engine_api, engine_body
from llmq.worker.runtime import Runtime

logger = logging.getLogger(__name__)


async def run_line(rt: Runtime, spec: p.JobSpec) -> tuple[p.Outcome, dict[str, Any] | None]:
    """Run one batch request and record its line; returns the job's outcome and the
    engine's usage (None when it did not answer)."""
    batches = rt.batches
    ok = False
    usage: dict[str, Any] | None = None
    try:
        opened = rt.store.sealer.open_spec(spec)
        rt.check_kind(spec)
        async with asyncio.timeout(rt.settings.request_timeout_s):
            result = await _answer(rt, opened)
        line, ok = output_line(spec.id, spec.custom_id, 200, result), True
        outcome = p.Outcome.COMPLETED
        usage = result.get("usage")
    except TimeoutError:
        message = f"generation exceeded {rt.settings.request_timeout_s:g}s"
        line = failure_line(spec.id, spec.custom_id, "request_timeout", message)
        outcome = p.Outcome.TIMEOUT
    except PayloadUndecryptable as exc:  # never retried: no key here opens it
        line = failure_line(spec.id, spec.custom_id, exc.code or "error", exc.message)
        outcome = p.Outcome.UNDECRYPTABLE
    except (UpstreamError, WrongModelKind) as exc:  # a response with its status
        line = output_line(spec.id, spec.custom_id, exc.status, exc.body())
        outcome = p.Outcome.REJECTED if exc.status < 500 else p.Outcome.ENGINE_ERROR
    except ServiceError as exc:
        line = failure_line(spec.id, spec.custom_id, exc.code or "error", exc.message)
        outcome = p.Outcome.ENGINE_ERROR
    await batches.record(spec, line, ok)
    rt.metrics.batch_requests.labels("completed" if ok else "failed").inc()
    return outcome, usage


async def _answer(rt: Runtime, spec: p.JobSpec) -> dict[str, Any]:
    """A line's answer as its endpoint gives it (``spec``: opened)."""
    if spec.api is p.Api.EMBEDDINGS:  # merged with the other embedding jobs, as a client's
        vectors, tokens = await rt.embedder.embed(spec.body)
        encoding = str(spec.body.get("encoding_format") or "float")
        return embeddings.answer(spec.model, vectors, tokens, encoding)
    body = dict(engine_body(spec, rt.settings.engine_priority))
    echoed = body.pop(ECHO_KEY, None)  # a /v1/responses line: its answer's shape
    result = await rt.engine.complete(body, engine_api(spec))
    result["id"] = spec.id
    return result if echoed is None else from_completion(spec.id, result, echoed)


async def record_cancelled(rt: Runtime, spec: p.JobSpec) -> None:
    """A batch request stopped midway (its worker is stopping): an error line, not a
    re-run (its engine request may have run already: at most once)."""
    line = failure_line(spec.id, spec.custom_id, "cancelled", "the worker stopped")
    try:
        await rt.batches.record(spec, line, False)
    except RedisError as exc:
        logger.warning("batch request %s: could not record its end: %s", spec.id, exc)


def _line_spec(
    rec: BatchRecord, index: int, raw: bytes, aliases: dict[str, str], extra: frozenset[str]
) -> p.JobSpec:
    """A batch line's job (validated at upload; ``extra``: PASSTHROUGH_EXTRA, for a
    /v1/responses line)."""
    line = json.loads(raw)
    body, url = line["body"], line.get("url")
    body["model"] = aliases.get(body["model"], body["model"])  # the served name (its routes)
    job_id = names.batch_job_id(rec.id, index)
    spec: p.JobSpec
    if url == p.Api.EMBEDDINGS.path:
        req = EmbeddingRequest.model_validate(body)
        spec = embeddings.to_job_spec(req, job_id, tenant=rec.tenant, band=p.Band.LOW)
    elif url == p.Api.COMPLETIONS.path:
        text = CompletionRequest.model_validate(body)
        spec = completions.to_job_spec(text, job_id, tenant=rec.tenant, band=p.Band.LOW)
    else:  # chat, or a /v1/responses line: the chat body it becomes
        responses = url == p.Api.RESPONSES.path
        chat = ChatCompletionRequest.model_validate(batch_body(body, extra) if responses else body)
        spec = to_job_spec(chat, job_id, tenant=rec.tenant, band=p.Band.LOW)
        spec = spec.model_copy(update={"api": p.Api.RESPONSES if responses else p.Api.CHAT})
    update = {"batch_id": rec.id, "batch_index": index, "custom_id": str(line["custom_id"])}
    return spec.model_copy(update=update)


class BatchFeeder:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.batches: BatchStore = rt.batches
        self.store = rt.store
        self.interval_s = rt.settings.batch_feed_s

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except RedisError as exc:
                logger.debug("batch feeder: Redis: %s", exc)
            except Exception:
                logger.exception("batch feeder failed; retrying")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        if not self.rt.engine_ready:  # its lines would only fail: let a ready worker feed
            return
        for batch_id in await self.batches.active():
            rec = await self.batches.batch(batch_id)
            if rec is not None:
                await self.step(rec)

    async def step(self, rec: BatchRecord) -> None:
        if (
            rec.status is BatchStatus.IN_PROGRESS
            and not rec.ending
            and time.time() >= rec.expires_at
        ):
            await self.batches.end(rec.id, "expired")
            rec = await self.batches.batch(rec.id) or rec
        inflight = await self.batches.inflight(rec.id)
        if rec.ending:
            if not await self.batches.take_back(self.store, rec):
                await self._finalize(rec)
            return
        if rec.status is BatchStatus.FINALIZING:  # its finalizer died: done again
            await self._finalize(rec)
            return
        if rec.status is not BatchStatus.IN_PROGRESS:
            return
        if rec.next >= rec.total and not inflight:
            await self._finalize(rec)

    async def fill(self, idle: int) -> int:
        """Feed up to ``idle`` lines of the active batches (each within its
        ``max_inflight``) for the caller's idle slots; returns how many were fed."""
        fed = 0
        for batch_id in await self.batches.active():
            if fed >= idle:
                break
            rec = await self.batches.batch(batch_id)
            if rec is None or rec.status is not BatchStatus.IN_PROGRESS or rec.ending:
                continue
            if rec.next >= rec.total or time.time() >= rec.expires_at:  # the tick ends it
                continue
            room = min(idle - fed, rec.max_inflight - await self.batches.count_inflight(rec.id))
            if room > 0:
                fed += await self._feed(rec, room)
        return fed

    async def _feed(self, rec: BatchRecord, room: int) -> int:
        stop = min(rec.total, rec.next + room)
        try:
            lines = await self.batches.file_lines(rec.input_file_id, rec.next, stop - 1)
        except PayloadUndecryptable as exc:  # sealed with a key no longer held
            logger.warning("batch %s: its input file does not open: %s", rec.id, exc.message)
            await self.batches.fail(rec, f"the input file does not open: {exc.message}")
            return 0
        if len(lines) != stop - rec.next:
            logger.warning("batch %s: its input file is gone", rec.id)
            await self.batches.fail(rec, "the input file expired or was deleted")
            return 0
        aliases = json.loads(rec.routes or "{}")
        extra = self.rt.settings.passthrough_extra
        specs = [_line_spec(rec, rec.next + i, raw, aliases, extra) for i, raw in enumerate(lines)]
        fed = await self.batches.feed(rec, specs, stop)
        if fed:
            logger.debug("batch %s: fed lines %d..%d", rec.id, rec.next, stop - 1)
        return fed

    async def _finalize(self, rec: BatchRecord) -> None:
        done = await self.batches.finalize(rec)
        if done is not None:
            self.rt.metrics.batches.labels(done.status.value).inc()
            logger.info(
                "batch %s: %s (%d completed, %d failed of %d)",
                rec.id,
                done.status.value,
                done.completed,
                done.failed,
                done.total,
            )
