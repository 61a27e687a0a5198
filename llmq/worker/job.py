"""The arq job function: run one job (chat, Responses, completions, embeddings) against
the engine and publish its events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind, StatusCode
from redis.exceptions import RedisError

from llmq.shared import embeddings, tracing
from llmq.shared.errors import (
    EngineUnavailable,
    PayloadUndecryptable,
    RequestTimeout,
    ServiceError,
    ShuttingDown,
    UpstreamError,
    WorkerLost,
    WrongModelKind,
)
from llmq.shared.logs import record_line
from llmq.shared.protocol import Api, EventType, JobSpec, Outcome
from llmq.shared.queue.jobs import PAYLOAD_SLACK_MS
from llmq.worker import batch
from llmq.worker.continuation import (
    Continuation,
    NotContinuable,
    continuing,
    exact_usage,
    limited,
    progress_of,
    without_role,
)
from llmq.worker.engine import engine_api, engine_body, refuses_auto_tools, stream_error
from llmq.worker.publisher import ClientGone, Publisher
from llmq.worker.runtime import Runtime, Watch, mark_entered, runtime_of

logger = logging.getLogger(__name__)
jobs_logger = logging.getLogger("llmq.jobs")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


_ID_PREFIX = b'{"id":"'
_FINISH = b'"finish_reason"'
_NOT_FINISHED = b'"finish_reason":null'


def relabel(raw: bytes, job_id: bytes) -> bytes | None:
    """The hot path, once per token: a plain delta chunk with the engine's id replaced by
    the job's, rewritten on the bytes (no JSON parse and dump). None when the chunk must be
    parsed: a finishing chunk, the usage chunk, an error, or any unusual shape. (A quote
    inside a string is escaped, so the markers below only match the JSON's own keys.)"""
    if not raw.startswith(_ID_PREFIX) or b"\n" in raw:
        return None
    end = raw.find(b'"', len(_ID_PREFIX))
    if end < 0 or raw[end - 1] == 0x5C:  # no end, or an escaped quote in the id
        return None
    rest = raw[end:]
    finishes = rest.count(_FINISH)
    if finishes == 0 or rest.count(_NOT_FINISHED) != finishes:
        return None
    return _ID_PREFIX + job_id + rest


def _classify(raw: bytes, spec: JobSpec, job_id: bytes) -> tuple[str, Any]:
    """One engine chunk -> ("delta", bytes to publish) | ("final", the finishing chunk) |
    ("usage", the usage or None); raises the engine's error chunk."""
    out = relabel(raw, job_id)
    if out is not None:
        return "delta", out
    chunk = json.loads(raw)
    if not isinstance(chunk, dict):
        raise ValueError(f"engine chunk is not a JSON object: {raw[:80]!r}")
    err = stream_error(chunk)
    if err is not None:
        raise err
    chunk["id"] = spec.id
    choices = chunk.get("choices") or []
    if not choices:
        return "usage", chunk.get("usage")
    if any(c.get("finish_reason") for c in choices):
        return "final", chunk
    return "delta", _dumps(chunk).encode()


def _timings(spec: JobSpec, t_picked: float, t_first: float, tokens: int) -> dict[str, Any]:
    """A stored job's timings as the worker saw them (wall clock, ms since the enqueue):
    a resumed stream or a retrieval has no gateway that saw the request arrive."""
    now = time.time()
    enqueued = spec.enqueued_at_ms / 1000
    gen_s = now - (t_first or t_picked)
    return {
        "queue_wait_ms": round(max(0.0, t_picked - enqueued) * 1000, 2),
        "ttft_ms": round(max(0.0, (t_first or now) - enqueued) * 1000, 2),
        "total_ms": round(max(0.0, now - enqueued) * 1000, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / gen_s, 2) if gen_s > 0 else None,
    }


def _tokens(usage: dict[str, Any] | None) -> int:
    return int((usage or {}).get("completion_tokens") or 0)


@dataclass
class Resumed:
    """A migrated job as its new worker runs it: its continuation (None: it runs from the
    start), and whether its client already has the role delta."""

    cont: Continuation | None
    chunked: bool
    made: int = 0  # answer tokens its client already has (set once counted)
    prompt: int = -1  # its prompt's tokens as first sent (-1: not counted)
    usage: dict[str, Any] | None = None  # its whole answer's, when nothing was left to make

    def whole(self, rt: Runtime, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """The whole answer's usage from the continuation's (``continuation.exact_usage``);
        the tokens prefilled again are counted."""
        prompt = self.prompt
        if prompt < 0 and usage is not None:  # not counted: the engine's, less the answer's
            prompt = max(0, int(usage.get("prompt_tokens") or 0) - self.made)
        rt.metrics.migration_tokens.labels("reprefilled").inc(max(0, prompt) + self.made)
        return exact_usage(usage, prompt, self.made)


async def _count_made(rt: Runtime, resumed: Resumed, cont: Continuation, chunks: int) -> None:
    """The tokens of the answer so far and of the prompt, as the engine counts them; an
    engine without ``/tokenize`` (404): one token per delta sent, the prompt unknown."""
    try:
        base, extended = await asyncio.gather(
            rt.engine.count_tokens(cont.prompt), rt.engine.count_tokens(cont.extended)
        )
    except UpstreamError as exc:
        if exc.status != 404:
            raise
        resumed.made = chunks
        return
    resumed.made, resumed.prompt = max(0, extended - base), base


def _first_token(rt: Runtime, pub: Publisher, ttft_s: float | None) -> None:
    if ttft_s is not None:
        pub.first_token_s = ttft_s
        rt.metrics.engine_ttft.observe(ttft_s, exemplar=tracing.exemplar())


async def _roleless(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A continuation's chunks, its first delta without the role its client already has
    (dropped when nothing else is left in it)."""
    first = True
    async for raw in chunks:
        if first:
            first = False
            stripped = without_role(raw)
            if stripped is None:
                continue
            raw = stripped
        yield raw


async def _continued(
    rt: Runtime,
    spec: JobSpec,
    pub: Publisher,
    resumed: Resumed,
    cont: Continuation,
    chunks_sent: int,
) -> JobSpec | None:
    """The job as its continuation asks the engine (its limit reduced by the tokens made);
    None when nothing was left to make: its finish is sent here."""
    await _count_made(rt, resumed, cont, chunks_sent)
    body = limited(cont, resumed.made)
    if body is not None:
        return spec.model_copy(update={"body": body})
    done = _cut_at_limit(spec, resumed)
    resumed.usage = done["usage"]
    await pub.send(EventType.DONE, _dumps(done))
    return None


def _cut_at_limit(spec: JobSpec, resumed: Resumed) -> dict[str, Any]:
    """A continuation with nothing left to make: the answer reached its token limit just as
    it was cut; what is left to send is its finish."""
    kind = "text_completion" if spec.api is Api.COMPLETIONS else "chat.completion.chunk"
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if spec.api is Api.COMPLETIONS:
        choice["text"] = ""
    else:
        choice["delta"] = {}
    usage: dict[str, Any] = {"prompt_tokens": max(0, resumed.prompt), "completion_tokens": 0}
    final: dict[str, Any] = {
        "id": spec.id,
        "object": kind,
        "created": int(time.time()),
        "model": spec.body.get("model", spec.model),
        "choices": [choice],
    }
    return {"final": final, "usage": exact_usage(usage, max(0, resumed.prompt), resumed.made)}


async def _stream(
    rt: Runtime,
    spec: JobSpec,
    pub: Publisher,
    t_picked: float,
    resumed: Resumed | None = None,
) -> dict[str, Any] | None:
    """Relay the engine's chunks; hold the finishing chunk and usage for the DONE event.
    ``resumed``: a migrated job, continued from what its client has (its body already the
    continuation's: ``_continued``)."""
    t0 = time.monotonic()
    final: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    first = True
    t_first = t_first_wall = last = 0.0
    job_id = spec.id.encode()
    interval = rt.stream_interval()
    slots = rt.slots  # MAX_ACTIVE=auto: each delta's gap measures the engine's time per token
    body = engine_body(spec, rt.settings.engine_priority, interval)
    async with rt.engine.stream(body, engine_api(spec)) as engine_chunks:
        chunks = _roleless(engine_chunks) if resumed and resumed.chunked else engine_chunks
        async for raw in chunks:
            kind, value = _classify(raw, spec, job_id)
            if kind == "usage":
                usage = value or usage
                continue
            if first:
                t_first = last = time.monotonic()
                t_first_wall = time.time()
                # (A continuation's first token says nothing of the engine's TTFT.)
                _first_token(rt, pub, t_first - t0 if resumed is None else None)
                await pub.announced()
                first = False
            elif slots is not None and kind == "delta":
                now = time.monotonic()
                slots.sample(now - last, interval, rt.active)
                last = now
            if kind == "delta":
                await pub.send(EventType.CHUNK, value)
                continue
            if final is not None:  # n > 1: earlier choices' finish chunks go out as-is
                await pub.send(EventType.CHUNK, _dumps(final))
            final = value
    await pub.announced()
    if resumed is not None and resumed.cont is not None:
        usage = resumed.whole(rt, usage)
    tokens = _tokens(usage)
    done: dict[str, Any] = {"final": final, "usage": usage}
    if spec.stored:
        done["timings"] = _timings(spec, t_picked, t_first_wall, tokens)
    await pub.send(EventType.DONE, _dumps(done))
    if t_first and tokens > 1:
        rate = (tokens - 1) / max(1e-6, time.monotonic() - t_first)
        rt.metrics.decode_rate.observe(rate)
        rt.observe_itl(1 / rate)
    return usage


async def _complete(
    rt: Runtime, spec: JobSpec, pub: Publisher, t_picked: float
) -> dict[str, Any] | None:
    result = await rt.engine.complete(
        engine_body(spec, rt.settings.engine_priority), engine_api(spec)
    )
    await pub.announced()
    result["id"] = spec.id
    if spec.stored:
        result["timings"] = _timings(spec, t_picked, 0.0, _tokens(result.get("usage")))
    await pub.send(EventType.RESULT, _dumps(result))
    usage: dict[str, Any] | None = result.get("usage")
    return usage


async def _embed(
    rt: Runtime, spec: JobSpec, pub: Publisher, t_picked: float
) -> dict[str, Any] | None:
    """An embeddings job: its vectors (merged with other jobs' into one engine request:
    ``worker.embeddings``), published as the client's whole answer."""
    vectors, tokens = await rt.embedder.embed(spec.body)
    await pub.announced()
    encoding = str(spec.body.get("encoding_format") or "float")
    out = embeddings.answer(spec.model, vectors, tokens, encoding)
    await pub.send(EventType.RESULT, embeddings.encode(out))
    return {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}


def _count(rt: Runtime, usage: dict[str, Any] | None, used: list[int]) -> None:
    """Token metrics, and the exact tokens used into ``used`` (prompt, completion)."""
    if usage:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        rt.metrics.tokens.inc(completion)
        rt.metrics.prompt_tokens.inc(prompt)
        used.extend((prompt, completion))


async def _fail(pub: Publisher, err: ServiceError) -> None:
    """Tell the client why the job ended; best effort (nobody may listen, Redis may be down)."""
    with contextlib.suppress(ClientGone, RedisError):
        await pub.announced()
        await pub.send(EventType.ERROR, _dumps(err.to_wire()))


class Handover(Exception):
    """The job's engine failed (``reason``): it goes to another worker if it can, else it
    ends with ``error``."""

    def __init__(self, reason: str, error: ServiceError) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


async def _engine_failed(rt: Runtime, exc: ServiceError) -> bool:
    """Whether a job's failure is its engine's (it is unreachable, broke the stream or
    answered 5xx, and its ``/health`` fails too), as opposed to this request's: only then
    is the job handed over (MIGRATE) and the worker not ready until ``/health`` answers."""
    if not rt.settings.migrations:
        return False
    if isinstance(exc, UpstreamError) and exc.status < 500:
        return False
    return not await rt.engine.healthy()


async def _generate(
    rt: Runtime,
    spec: JobSpec,
    pub: Publisher,
    used: list[int],
    resumed: Resumed | None = None,
    chunks_sent: int = 0,
) -> Outcome:
    """Run the job inside REQUEST_TIMEOUT_S; returns the outcome label. The exact tokens
    used (prompt, completion) go into ``used`` when the engine reported them. Raises
    Handover when its engine failed (``_engine_failed``)."""
    s = rt.settings
    try:
        rt.check_kind(spec)
        async with asyncio.timeout(s.request_timeout_s):
            _count(rt, await _answer(rt, spec, pub, resumed, chunks_sent), used)
        return Outcome.COMPLETED
    except WrongModelKind as exc:
        logger.info("job %s: %s", spec.id, exc.message)
        await _fail(pub, exc)
        return Outcome.REJECTED
    except TimeoutError:
        logger.warning("job %s: request timeout after %.1fs", spec.id, s.request_timeout_s)
        await _fail(pub, RequestTimeout(f"generation exceeded {s.request_timeout_s:g}s"))
        return Outcome.TIMEOUT
    except ClientGone:
        logger.info("job %s: no listener for %.1fs, abandoning", spec.id, s.orphan_grace_s)
        return Outcome.CLIENT_GONE
    except UpstreamError as exc:
        if await _engine_failed(rt, exc):
            raise Handover("engine_error", exc) from exc
        # %r: the engine's message may echo client input (a newline must not forge a line).
        logger.info("job %s: engine answered %d: %r", spec.id, exc.status, exc.message[:500])
        if refuses_auto_tools(exc):  # the next heartbeat tells gateways (they refuse at once)
            rt.auto_tools = False
        await _fail(pub, exc)
        return Outcome.REJECTED if exc.status < 500 else Outcome.ENGINE_ERROR
    except ServiceError as exc:
        if isinstance(exc, EngineUnavailable) and await _engine_failed(rt, exc):
            raise Handover("engine_error", exc) from exc
        logger.warning("job %s: %r", spec.id, exc.message[:500])
        await _fail(pub, exc)
        return Outcome.ENGINE_ERROR


async def _answer(
    rt: Runtime, spec: JobSpec, pub: Publisher, resumed: Resumed | None, chunks_sent: int
) -> dict[str, Any] | None:
    t_picked = time.time()
    if spec.api is Api.EMBEDDINGS:
        return await _embed(rt, spec, pub, t_picked)
    if spec.stream:
        return await _watched(rt, spec, pub, t_picked, resumed, chunks_sent)
    return await _complete(rt, spec, pub, t_picked)


async def _watched(
    rt: Runtime,
    spec: JobSpec,
    pub: Publisher,
    t_picked: float,
    resumed: Resumed | None,
    chunks_sent: int,
) -> dict[str, Any] | None:
    """A stream, watched for an engine stall (ENGINE_STALL_S) while it runs."""
    task = asyncio.current_task()
    if rt.settings.engine_stall_s and rt.settings.migrations and task is not None:
        rt.watching[spec.id] = Watch(task, pub.events, pub.events())
    try:
        if resumed is not None and resumed.cont is not None:
            left = await _continued(rt, spec, pub, resumed, resumed.cont, chunks_sent)
            if left is None:  # nothing was left to make
                return resumed.usage
            spec = left
        return await _stream(rt, spec, pub, t_picked, resumed)
    finally:
        rt.watching.pop(spec.id, None)


def engine_down(rt: Runtime, why: str) -> None:
    """This worker's engine failed: not ready (no picks; gateways stop counting its slots
    at its next heartbeat) until ``/health`` answers again (the probe)."""
    if rt.engine_ready:
        logger.warning("engine at %s failed (%s): NOT ready", rt.engine.base_url, why)
    rt.engine_ready = False
    rt.engine_suspect = True
    rt.metrics.engine_up.set(0)


async def _hand_over(
    rt: Runtime, spec: JobSpec, pub: Publisher, reason: str, error: ServiceError
) -> Outcome:
    """Give the job up to another worker (``queue.migration``), or end it with ``error``
    when it cannot go (MIGRATE off, MIGRATE_MAX reached, nobody else can take it)."""
    if reason != "drain":
        engine_down(rt, reason)
    try:
        handed = await rt.store.migration.hand_over(
            spec, rt.settings.worker_id, reason, rt.settings.migrations
        )
    except RedisError as exc:
        logger.warning("job %s: could not hand it over (Redis: %s)", spec.id, exc)
        handed = False
    if handed:
        logger.warning("job %s: handed over to another worker (%s)", spec.id, reason)
        rt.migrating[spec.id] = spec
        return Outcome.MIGRATED
    await _fail(pub, error)
    return Outcome.CANCELLED if reason == "drain" else Outcome.ENGINE_ERROR


async def chat(ctx: dict[str, Any], raw_spec: dict[str, Any]) -> dict[str, Any]:
    """arq job: ``chat(spec)``. Returns a small summary for arq's log line (arq keeps no
    result: ``keep_result=0``; the release script leaves ``llmq:outcome:<id>``).

    Its span (``process <model>``, a consumer span in the trace the request started: the
    job carries its context) covers the pickup to the release, with the queue wait, this
    worker, the cache-affinity pick and the outcome; the engine call inside it is the
    aiohttp instrumentation's span, which sends ``traceparent`` on."""
    rt = runtime_of(ctx)
    spec = JobSpec.model_validate(raw_spec)
    waited_s = max(0.0, time.time() - spec.enqueued_at_ms / 1000)
    with tracing.tracer().start_as_current_span(
        f"process {spec.model}",
        context=tracing.context_of(spec.trace),
        kind=SpanKind.CONSUMER,
        attributes=_span_attributes(rt, spec, waited_s),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            summary = await _run(rt, spec, waited_s)
        except BaseException as exc:  # cancelled (its client left, or the worker stops)
            kind = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
            span.set_attribute(tracing.ERROR_TYPE, kind)
            span.set_status(StatusCode.ERROR, kind)
            raise
        outcome = summary["outcome"]
        span.set_attribute("llmq.outcome", str(outcome))
        if outcome != Outcome.COMPLETED:
            span.set_attribute(tracing.ERROR_TYPE, str(outcome))
            span.set_status(StatusCode.ERROR, str(outcome))
        return summary


def _span_attributes(rt: Runtime, spec: JobSpec, waited_s: float) -> dict[str, Any]:
    """What the job's span says of its pickup (messaging conventions, and this service's);
    the job's affinity pick is taken out of ``Runtime.picks`` either way."""
    picked = rt.picks.pop(spec.id, None)
    if not tracing.enabled():
        return {}
    out: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": f"llmq:queue:{spec.model}",
        "messaging.message.id": spec.id,
        "llmq.worker": rt.settings.worker_id,
        "llmq.queue.wait_s": round(waited_s, 6),
        "llmq.band": spec.band.value,
        "llmq.api": spec.api.value,
    }
    if picked is not None:
        out["llmq.affinity"] = picked[0]
        if picked[1] >= 0:
            out["llmq.affinity.wait_s"] = picked[1] / 1000
    if spec.batch_id:
        out["llmq.batch"] = spec.batch_id
    return out


async def _run(rt: Runtime, spec: JobSpec, waited_s: float) -> dict[str, Any]:
    mark_entered(rt, spec.id)  # from here on it is never requeued (at most once)
    s = rt.settings
    hold = s.request_timeout_s + s.orphan_grace_s
    moves = rt.resumed.pop(spec.id, 0)
    # MIGRATE: its progress is logged while it may run (a batch line is never migrated).
    progress_ms = int(hold * 1000) + PAYLOAD_SLACK_MS if s.migrations and not spec.batch_id else 0
    pub = Publisher(
        rt.outbox,
        spec.id,
        s.orphan_grace_s,
        stored=spec.stored,
        unheard=spec.background,
        progress_ms=progress_ms,
    )
    rt.active += 1
    rt.metrics.active.set(rt.active)
    rt.metrics.pickup.observe(waited_s, exemplar=tracing.exemplar())
    outcome = Outcome.CANCELLED
    used: list[int] = []  # exact tokens (prompt, completion), when the engine reported them
    t_picked = time.monotonic()
    try:
        outcome = await _start(rt, spec, pub, used, hold, moves)
        return {"id": spec.id, "outcome": outcome}
    except Handover as exc:
        outcome = await _hand_over(rt, spec, pub, exc.reason, exc.error)
        return {"id": spec.id, "outcome": outcome}
    except PayloadUndecryptable as exc:  # not retried: no key here opens it
        outcome = Outcome.UNDECRYPTABLE
        logger.warning("job %s: %s", spec.id, exc.message)
        await _fail(pub, exc)
        return {"id": spec.id, "outcome": outcome}
    except asyncio.CancelledError:
        given_up = await _given_up(rt, spec, pub)
        if given_up is not None:
            outcome = given_up
            return {"id": spec.id, "outcome": outcome}
        # Aborted by the client (nobody hears this) or the worker is stopping (the client
        # learns why and may retry).
        logger.info("job %s: cancelled", spec.id)
        if spec.batch_id:
            await asyncio.shield(batch.record_cancelled(rt, spec))
        await _fail(pub, ShuttingDown("the job was cancelled (client gone or worker stopping)"))
        raise
    except ClientGone:
        outcome = Outcome.CLIENT_GONE
        return {"id": spec.id, "outcome": outcome}
    except RedisError as exc:
        # Its events cannot be delivered: stop (leaving the engine stream aborts the
        # request inside the engine). The gateway tells the client (queue_unavailable).
        outcome = Outcome.REDIS_ERROR
        logger.warning("job %s: lost Redis (%s); stopped", spec.id, exc)
        return {"id": spec.id, "outcome": outcome}
    except Exception:
        outcome = Outcome.ERROR
        logger.exception("job %s: failed", spec.id)
        await _fail(pub, ServiceError("the worker failed while running the job"))
        raise
    finally:
        if outcome is not Outcome.MIGRATED:  # (a migrated job keeps its places)
            await _release(rt, spec, outcome, used, time.monotonic() - t_picked, pub)
            rt.metrics.migrations.observe(moves)
        rt.active -= 1
        rt.metrics.active.set(rt.active)
        rt.metrics.jobs.labels(outcome).inc()
        _log_job(spec, outcome, waited_s, t_picked, used, rt.settings.worker_id)


async def _start(
    rt: Runtime, spec: JobSpec, pub: Publisher, used: list[int], hold: float, moves: int
) -> Outcome:
    """Start the job and run it: a batch line, a migrated job (``moves``), or a new one."""
    worker_id = rt.settings.worker_id
    if spec.batch_id:  # no client: its answer is a line of the batch's results
        await rt.store.jobs.mark_started(spec, worker_id, hold)
        outcome, usage = await batch.run_line(rt, spec)
        _count(rt, usage, used)
        rt.metrics.batch_tokens.inc(sum(used))
        return outcome
    if moves:
        return await _resume(rt, spec, pub, used, hold)
    # Announce the pickup while the engine request is already on its way: the two round
    # trips stay off the time-to-first-token path.
    pub.announce(rt.store.jobs.mark_started(spec, worker_id, hold), worker_id)
    return await _generate(rt, rt.store.sealer.open_spec(spec), pub, used)


async def _given_up(rt: Runtime, spec: JobSpec, pub: Publisher) -> Outcome | None:
    """A cancelled job this worker gave up (a drain past DRAIN_TIMEOUT_S, an engine stall:
    ``rt.giving_up``): its cancellation is taken back and it is handed over; None for any
    other cancellation (its client left, or the worker stops)."""
    reason = rt.giving_up.pop(spec.id, None)
    task = asyncio.current_task()
    if reason is None or spec.batch_id or task is None:
        return None
    task.uncancel()
    why: ServiceError = (
        ShuttingDown("the worker stopped before the job ended")
        if reason == "drain"
        else EngineUnavailable(f"the engine sent nothing for {rt.settings.engine_stall_s:g}s")
    )
    return await _hand_over(rt, spec, pub, reason, why)


async def _release(
    rt: Runtime, spec: JobSpec, outcome: Outcome, used: list[int], ran: float, pub: Publisher
) -> None:
    try:
        tokens = sum(used) if used else None
        await asyncio.shield(
            rt.store.jobs.release(
                spec, rt.settings.worker_id, tokens, outcome, ran, pub.first_token_s
            )
        )
    except RedisError as exc:  # the heartbeat retries once Redis is back
        logger.warning("job %s: could not release its place yet: %s", spec.id, exc)
        rt.unreleased[spec.id] = spec


async def _started() -> None:
    """(START already ran: a resumed job's, before its log is read.)"""


async def _resume(
    rt: Runtime, spec: JobSpec, pub: Publisher, used: list[int], hold: float
) -> Outcome:
    """A migrated job (``queue.migration``) on its new worker: started here, its log read,
    and its answer continued from what its client has (``worker.continuation``)."""
    worker_id = rt.settings.worker_id
    await rt.store.jobs.mark_started(spec, worker_id, hold)
    events, why = await asyncio.gather(
        rt.store.records.read_log(spec.id), rt.store.migration.why(spec.id)
    )
    rt.metrics.migrated.labels(why or "worker_lost").inc()
    opened = rt.store.sealer.open_spec(spec)
    progress = progress_of(events, opened.api)
    logger.info(
        "job %s: resumed here after its migration (%s): %d event(s), %d delta(s) sent",
        spec.id,
        why,
        progress.seq,
        progress.chunks,
    )
    if progress.ended:  # its answer is all out: only its release was missing
        return Outcome.COMPLETED
    if progress.seq:
        pub.resume_at(progress.seq)
    else:
        pub.announce(_started(), worker_id)
    try:
        cont = continuing(opened, progress)
    except NotContinuable as exc:
        logger.info("job %s: cannot be continued: %s", spec.id, exc)
        lost = WorkerLost(f"the worker running this job stopped; it cannot be continued: {exc}")
        await _fail(pub, lost)
        return Outcome.WORKER_LOST
    outcome = await _generate(
        rt, opened, pub, used, Resumed(cont, progress.chunked), progress.chunks
    )
    if cont is None and used:  # run again from the start: every token made again
        rt.metrics.migration_tokens.labels("regenerated").inc(used[1])
    return outcome


def _log_job(
    spec: JobSpec, outcome: Outcome, waited_s: float, t_picked: float, used: list[int], worker: str
) -> None:
    """The job's line in the worker log (as the gateway's access log: metadata only)."""
    record_line(
        jobs_logger,
        "job",
        {
            "id": spec.id,
            "key": spec.tenant,
            "model": spec.model,
            "band": spec.band.value,
            "outcome": outcome.value,
            "wait_ms": round(waited_s * 1000, 1),
            "run_ms": round((time.monotonic() - t_picked) * 1000, 1),
            "prompt_tokens": used[0] if used else None,
            "completion_tokens": used[1] if used else None,
            "worker": worker,
        },
    )
