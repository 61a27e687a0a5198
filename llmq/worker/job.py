"""The arq job function: run one job (chat, Responses, completions, embeddings) against
the engine and publish its events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from opentelemetry.trace import SpanKind, StatusCode
from redis.exceptions import RedisError

from llmq.shared import embeddings, tracing
from llmq.shared.errors import (
    PayloadUndecryptable,
    RequestTimeout,
    ServiceError,
    ShuttingDown,
    UpstreamError,
    WrongModelKind,
)
from llmq.shared.logs import record_line
from llmq.shared.protocol import Api, EventType, JobSpec, Outcome
from llmq.worker import batch
from llmq.worker.engine import engine_api, engine_body, refuses_auto_tools, stream_error
from llmq.worker.publisher import ClientGone, Publisher
from llmq.worker.runtime import Runtime, mark_entered, runtime_of

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


async def _stream(
    rt: Runtime, spec: JobSpec, pub: Publisher, t_picked: float
) -> dict[str, Any] | None:
    """Relay the engine's chunks; hold the finishing chunk and usage for the DONE event."""
    t0 = time.monotonic()
    final: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    first = True
    t_first = t_first_wall = last = 0.0
    job_id = spec.id.encode()
    interval = rt.stream_interval()
    slots = rt.slots  # MAX_ACTIVE=auto: each delta's gap measures the engine's time per token
    body = engine_body(spec, rt.settings.engine_priority, interval)
    async with rt.engine.stream(body, engine_api(spec)) as chunks:
        async for raw in chunks:
            kind, value = _classify(raw, spec, job_id)
            if kind == "usage":
                usage = value or usage
                continue
            if first:
                t_first = last = time.monotonic()
                t_first_wall = time.time()
                pub.first_token_s = t_first - t0
                rt.metrics.engine_ttft.observe(t_first - t0, exemplar=tracing.exemplar())
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


async def _generate(rt: Runtime, spec: JobSpec, pub: Publisher, used: list[int]) -> Outcome:
    """Run the job inside REQUEST_TIMEOUT_S; returns the outcome label. The exact tokens
    used (prompt, completion) go into ``used`` when the engine reported them."""
    s = rt.settings
    try:
        rt.check_kind(spec)
        async with asyncio.timeout(s.request_timeout_s):
            run = _embed if spec.api is Api.EMBEDDINGS else _stream if spec.stream else _complete
            _count(rt, await run(rt, spec, pub, time.time()), used)
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
        # %r: the engine's message may echo client input (a newline must not forge a line).
        logger.info("job %s: engine answered %d: %r", spec.id, exc.status, exc.message[:500])
        if refuses_auto_tools(exc):  # the next heartbeat tells gateways (they refuse at once)
            rt.auto_tools = False
        await _fail(pub, exc)
        return Outcome.REJECTED if exc.status < 500 else Outcome.ENGINE_ERROR
    except ServiceError as exc:
        logger.warning("job %s: %r", spec.id, exc.message[:500])
        await _fail(pub, exc)
        return Outcome.ENGINE_ERROR


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
    pub = Publisher(
        rt.outbox, spec.id, rt.settings.orphan_grace_s, stored=spec.stored, unheard=spec.background
    )
    rt.active += 1
    rt.metrics.active.set(rt.active)
    rt.metrics.pickup.observe(waited_s, exemplar=tracing.exemplar())
    outcome = Outcome.CANCELLED
    used: list[int] = []  # exact tokens (prompt, completion), when the engine reported them
    t_picked = time.monotonic()
    try:
        hold = rt.settings.request_timeout_s + rt.settings.orphan_grace_s
        # Announce the pickup while the engine request is already on its way: the two
        # round trips stay off the time-to-first-token path.
        worker_id = rt.settings.worker_id
        if spec.batch_id:  # no client: its answer is a line of the batch's results
            await rt.store.jobs.mark_started(spec, worker_id, hold)
            outcome, usage = await batch.run_line(rt, spec)
            _count(rt, usage, used)
            rt.metrics.batch_tokens.inc(sum(used))
            return {"id": spec.id, "outcome": outcome}
        pub.announce(rt.store.jobs.mark_started(spec, worker_id, hold), worker_id)
        outcome = await _generate(rt, rt.store.sealer.open_spec(spec), pub, used)
        return {"id": spec.id, "outcome": outcome}
    except PayloadUndecryptable as exc:  # not retried: no key here opens it
        outcome = Outcome.UNDECRYPTABLE
        logger.warning("job %s: %s", spec.id, exc.message)
        await _fail(pub, exc)
        return {"id": spec.id, "outcome": outcome}
    except asyncio.CancelledError:
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
        try:
            tokens = sum(used) if used else None
            ran = time.monotonic() - t_picked
            await asyncio.shield(
                rt.store.jobs.release(
                    spec, rt.settings.worker_id, tokens, outcome, ran, pub.first_token_s
                )
            )
        except RedisError as exc:  # the heartbeat retries once Redis is back
            logger.warning("job %s: could not release its place yet: %s", spec.id, exc)
            rt.unreleased[spec.id] = spec
        rt.active -= 1
        rt.metrics.active.set(rt.active)
        rt.metrics.jobs.labels(outcome).inc()
        _log_job(spec, outcome, waited_s, t_picked, used, rt.settings.worker_id)


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
