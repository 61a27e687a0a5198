"""Background tasks of a worker: heartbeat, engine probe, reaper, wake listener.

The heartbeat is written every HEARTBEAT_INTERVAL_S with the engine state the probe last
saw; the probe runs on its own so a slow engine never delays a beat (a missed beat is how
other processes decide this worker is dead). Each beat also runs the reaper, so workers
reclaim what a dead peer held even when no gateway runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from llmq.shared import tracing
from llmq.shared.protocol import ModelCard, ModelKind, WorkerInfo
from llmq.shared.queue.failover import OutageReaper
from llmq.shared.queue.names import WAKE_CHANNEL, WAKE_MODEL
from llmq.shared.queue.pubsub import connection_errors, listen
from llmq.shared.tasks import stop_if_cancelled
from llmq.worker.runtime import Runtime
from llmq.worker.slots import WINDOW_S, preemptions

logger = logging.getLogger(__name__)

_BACKOFF_MAX_S = 5.0


async def probe_engine(rt: Runtime) -> None:
    """Ask the engine for its models; record whether it is ready."""
    with tracing.quiet():
        models = await rt.engine.models()
        # An engine that failed a job (worker.job): ready again only once /health answers.
        if models is not None and rt.engine_suspect:
            models = models if await rt.engine.healthy() else None
            rt.engine_suspect = models is None
    ready = models is not None
    if ready != rt.engine_ready:
        logger.info("engine at %s is %s", rt.engine.base_url, "ready" if ready else "NOT ready")
    if ready and not rt.engine_ready:  # (re)started: its flags and models may have changed
        rt.auto_tools = None
        rt.kinds = {}
    rt.engine_ready = ready
    if models:
        if rt.models and tuple(m.id for m in models) != rt.models:
            logger.info("engine now serves %s", ", ".join(m.id for m in models))
        rt.cards = tuple(_with_kind(rt, m) for m in models)
        rt.models = tuple(m.id for m in models)
        rt.max_model_len = max(m.max_model_len for m in models)
    rt.metrics.engine_up.set(1 if ready else 0)


def _with_kind(rt: Runtime, card: ModelCard) -> ModelCard:
    known = rt.kinds.get(card.id)
    if known is None:
        return card
    return card.model_copy(
        update={"kind": known.kind, "dimensions": known.dimensions, "matryoshka": known.matryoshka}
    )


async def probe_kinds(rt: Runtime) -> None:
    """Once per engine (re)start and served model: is it a generative or an embedding
    model (``EngineClient.kind``)? The heartbeat carries the answer on the model's card:
    gateways refuse the wrong endpoint before queueing, and jobs are checked here too."""
    if not rt.engine_ready:
        return
    for card in rt.cards:
        if card.id in rt.kinds:
            continue
        with tracing.quiet():
            found = await rt.engine.kind(card.id)
        if found is None:
            continue  # asked again at the next probe
        rt.kinds[card.id] = found
        if found.kind is ModelKind.EMBED:
            how = "matryoshka" if found.matryoshka else "fixed length"
            logger.info("model %s: embeddings, %d dimensions (%s)", card.id, found.dimensions, how)
        else:
            logger.info("model %s: generation (chat, completions)", card.id)
    rt.cards = tuple(_with_kind(rt, c) for c in rt.cards)


async def probe_tools(rt: Runtime) -> None:
    """Once per engine (re)start: does it take tools with tool_choice "auto"? One 1-token
    request; the heartbeat carries the answer, and gateways refuse such requests at once
    when it is no (a job also learns it from the engine's refusal)."""
    if not rt.engine_ready or not rt.models or rt.auto_tools is not None:
        return
    generative = [c.id for c in rt.cards if c.kind is ModelKind.GENERATE]
    if not generative:  # an embedding engine (or kinds not known yet): nothing to ask
        return
    with tracing.quiet():
        rt.auto_tools = await rt.engine.auto_tools(generative[0])
    logger.info(
        "engine %s tools with tool_choice auto",
        {True: "takes", False: "does NOT take", None: "may or may not take"}[rt.auto_tools],
    )


async def write_heartbeat(rt: Runtime) -> None:
    """Publish this worker's capacity, load and models."""
    s = rt.settings
    info = WorkerInfo(
        worker_id=s.worker_id,
        max_active=rt.capacity,
        active=rt.active,
        models=rt.models,
        engine_ready=rt.engine_ready,
        max_model_len=rt.max_model_len,
        auto_tools=rt.auto_tools,
        cards=rt.cards,
        engine_url=rt.engine.base_url,
        started_at=rt.started_at,
    )
    await rt.store.workers.heartbeat(info, s.heartbeat_ttl_s)


async def beat_once(rt: Runtime) -> None:
    """Start-up: probe, then beat, so the first heartbeat already tells the truth."""
    await probe_engine(rt)
    await probe_kinds(rt)
    await write_heartbeat(rt)


async def heartbeat_loop(rt: Runtime) -> None:
    failing = False
    reaper = OutageReaper(rt.store.workers, rt.settings.heartbeat_ttl_s, logger)
    while True:
        try:
            await write_heartbeat(rt)
            await reaper.reap()
            await _forget_unreleased(rt)
            count_dropped(rt, await rt.store.deadlines.sweep(rt.models))
            if failing:
                logger.info("heartbeat restored")
                reaper.redis_back()
            failing = False
            rt.metrics.redis_up.set(1)
        except RedisError as exc:
            stop_if_cancelled()
            if not failing:
                logger.warning("heartbeat failed (Redis: %s); retrying", exc)
            failing = True
            rt.metrics.redis_up.set(0)
        await asyncio.sleep(rt.settings.heartbeat_interval_s)


async def stall_loop(rt: Runtime) -> None:
    """ENGINE_STALL_S: a streamed job whose engine sent nothing for that long is given up
    (``worker.job``: handed over to another worker) and the engine counts as failed."""
    stall = rt.settings.engine_stall_s
    every = min(1.0, stall / 4)
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        for job_id, watch in list(rt.watching.items()):
            seen = watch.events()
            if seen != watch.seen:
                watch.seen, watch.since = seen, now
            elif now - watch.since >= stall and job_id not in rt.giving_up:
                logger.warning("job %s: no engine token for %.1fs: engine stalled", job_id, stall)
                rt.giving_up[job_id] = "engine_stall"
                watch.task.cancel()


def count_dropped(rt: Runtime, dropped: dict[str, int]) -> None:
    """Late jobs a pick or the sweep dropped (their deadline passed unstarted)."""
    for model, n in dropped.items():
        rt.metrics.dropped_late.inc(n)
        logger.info("%d job(s) of %s dropped: their deadline passed in the queue", n, model)


async def slots_loop(rt: Runtime, wake: Callable[[], None]) -> None:
    """MAX_ACTIVE=auto: every ``slots.WINDOW_S``, the window's time per token and the
    engine's preemptions (its ``/metrics``) set the live limit (``worker.slots``); a limit
    that grew wakes the worker (free slots), and the heartbeat advertises it."""
    slots = rt.slots
    if slots is None:
        return
    seen: float | None = None
    while True:
        await asyncio.sleep(WINDOW_S)
        text = await rt.engine.metrics_text()
        count = preemptions(text) if text is not None else None
        preempted = seen is not None and count is not None and count > seen
        seen = count if count is not None else seen
        slots.busy(rt.active)
        before = slots.limit
        limit = slots.adjust(preempted)
        if slots.last is not None and slots.last.tpot_s:
            rt.metrics.tpot.set(slots.last.tpot_s)
        if preempted:
            rt.metrics.preempted.inc()
        if limit != before:
            rt.metrics.max_active.set(limit)
            logger.info(
                "slots %d -> %d (time per token %.1f ms with %.1f running, objective %.0f ms%s)",
                before,
                limit,
                (slots.last.tpot_s if slots.last else 0.0) * 1000,
                slots.last.running if slots.last else 0.0,
                slots.objective_s * 1000,
                "; the engine preempted" if preempted else "",
            )
        if limit > before:
            wake()


async def _forget_unreleased(rt: Runtime) -> None:
    for job_id, spec in list(rt.unreleased.items()):
        await rt.store.jobs.forget(spec, rt.settings.worker_id)
        del rt.unreleased[job_id]
        logger.info("job %s: its traces removed now that Redis is back", job_id)


async def probe_loop(rt: Runtime) -> None:
    tried_tools = False
    while True:
        was_ready = rt.engine_ready
        await probe_engine(rt)
        if rt.engine_ready and not was_ready:
            tried_tools = False
        await probe_kinds(rt)
        if not tried_tools and rt.engine_ready and rt.kinds:
            await probe_tools(rt)  # an unclear answer is not asked again until a restart
            tried_tools = True
        await asyncio.sleep(rt.settings.heartbeat_interval_s)


def _on_wake(rt: Runtime, msg: dict[str, object], wake: Callable[[], None]) -> None:
    """A job enqueued for a model wakes only the workers serving it; anything else (an
    abort, a batch created) wakes every worker."""
    if msg.get("type") != "message":
        return
    data = msg.get("data")
    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    if text.startswith(WAKE_MODEL) and text[len(WAKE_MODEL) :] not in rt.models:
        return
    wake()


async def wake_listener(rt: Runtime, wake: Callable[[], None]) -> None:
    """Call ``wake()`` for every message on the wake channel; reconnect after errors.

    The connection is pinged when silent, so a Redis that restarted (or froze) is noticed
    and the subscription re-created. Missing a wake-up only costs latency: the worker also
    re-checks every WAKE_FALLBACK_S.
    """
    backoff = 0.1
    while True:
        pubsub = rt.store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            with connection_errors():
                await pubsub.subscribe(WAKE_CHANNEL)
            wake()  # anything enqueued while we were not subscribed
            backoff = 0.1
            await listen(pubsub, lambda msg: _on_wake(rt, msg, wake))
        except (RedisError, OSError) as exc:
            stop_if_cancelled()
            logger.warning("wake listener lost Redis (%s); resubscribing in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(_BACKOFF_MAX_S, backoff * 2)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
