"""``WakeableWorker``: arq's Worker, woken instead of polled, with its state as attributes.

arq's main loop calls ``_poll_iteration`` every ``poll_delay`` (0.5 s by default), which
would add up to half a second to time-to-first-token. Here ``poll_delay`` is 0 and each
iteration first waits for a wake-up: a message on ``llmq:wake`` (a job was enqueued or an
abort requested) or a slot freeing, with WAKE_FALLBACK_S as a safety net.

arq's iteration also reads the first 100 queue entries and tries each, running ones
included (arq keeps running jobs in the queue): three Redis round trips per running job
before it reaches a waiting one, tens of milliseconds with a few dozen slots busy. Here one
Lua call (``Store.routing.pick``: highest priority band first, fair across API keys, then
cache-aware) returns
only waiting jobs, as many as there are free slots, and claims them in the same step (arq's
in-progress key), so arq's ``start_jobs`` and its four round trips per job are skipped:
``_start_claimed`` does its slot accounting and starts arq's ``run_job``. The rest of the
iteration (aborts, finished tasks, arq's health key) is arq's, step by step.

This is the one module that touches arq's internals. ``ARQ_SEAM`` lists every member of
``arq.worker.Worker`` it relies on, with its signature and, for the methods it overrides or
whose behaviour it depends on, a hash of arq's source (``shared.seams``, as for uvicorn).
``seam_problems()`` compares them with the installed arq: ``build_worker`` refuses to start
when a member is missing or its signature changed, and a unit test (the tripwire) also
checks the hashes, so an arq upgrade fails loudly instead of silently falling back to the
WAKE_FALLBACK_S re-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from llmq.shared import seams, tracing
from llmq.shared.seams import Pin
from llmq.shared.tasks import log_failure, stop_if_cancelled, stop_task
from llmq.worker.batch import BatchFeeder
from llmq.worker.heartbeat import (
    beat_once,
    count_dropped,
    heartbeat_loop,
    probe_loop,
    slots_loop,
    stall_loop,
    wake_listener,
)
from llmq.worker.runtime import RUNTIME, Runtime

logger = logging.getLogger(__name__)
_PICKS_KEPT = 10_000  # picks whose job never started (requeued) are not kept past this

_BACKOFF_MAX_S = 5.0
# Feed-and-pick rounds per turn for idle slots: a batch whose next lines are another model's
# feeds those (its workers are woken) and this worker tries again, a few times per turn.
_FEED_ROUNDS = 4
CLAIM_CHECK_S = 2.0  # how often (and after how long) unstarted claims are requeued
HAND_OVER_WAIT_S = 10.0  # a drain's jobs given up: this long to hand themselves over


# Pinned against arq 0.28.0 (pyproject: >=0.28,<0.29). After an upgrade, read arq's new
# source of each hashed member, adapt this module if needed, then update the hash.
ARQ_SEAM: dict[str, Pin] = {
    "__init__": Pin(signature=None, why="keyword arguments passed by build_worker (checked)"),
    "main": Pin(
        "(self) -> None",
        "45ca1591c9717466eec76e17fa958f84acf6085103d692a84ee25d9904e7f8fc",
        "calls on_startup, then _poll_iteration in a loop sleeping poll_delay (0 here)",
    ),
    "_poll_iteration": Pin(
        "(self) -> None",
        "f8d39d823a0a59f27a45f1c0e80bee44e16219d5072235fbc81866402298322f",
        "overridden: ours must do what arq's does, apart from picking jobs",
    ),
    "start_jobs": Pin(
        "(self, job_ids: list[bytes]) -> None",
        "b45797cfa40bed7fe6e9b8b8100c5f5b4144fe85112155c4e355df6ed8521f5f",
        "not called: _start_claimed does its slot accounting (sem, job_counter, tasks, "
        "run_job, _release_sem_dec_counter_on_complete) for jobs the pick script claimed "
        "(the in-progress key it sets, for in_progress_timeout_s)",
    ),
    "run_job": Pin(
        "(self, job_id: str, score: int) -> None",
        "589a19059ff84ee777552dc9fa5ff76b17d6d0d7f99716d2720a2ed07ccb9607",
        "started by _start_claimed as start_jobs starts it; must not re-check the claim",
    ),
    "_release_sem_dec_counter_on_complete": Pin(
        "(self) -> None",
        "0ed101482e942c33a64ccbe19eb3c4d29da9497258b1ffb1380da300da9bc481",
        "overridden: a freed slot wakes the loop",
    ),
    "_cancel_aborted_jobs": Pin("(self) -> None", None, "called from our _poll_iteration"),
    "heart_beat": Pin("(self) -> None", None, "called from our _poll_iteration"),
    "handle_sig_wait_for_completion": Pin(
        "(self, signum: signal.Signals) -> None",
        "8f161d86834cc74ee2293cf004c5456c4c01614d651e6daa03f5d7d81863435f",
        "overridden: withdraw the heartbeat first, then arq's drain (ours with MIGRATE: what "
        "runs at DRAIN_TIMEOUT_S is handed over, not cut)",
    ),
    "_sleep_until_tasks_complete": Pin(
        "(self) -> None", None, "awaited by our drain (until every job task is done)"
    ),
    "job_tasks": Pin(why="job id -> the job function's task: a drain cancels these"),
    "main_task": Pin(why="cancelled at the end of our drain, as arq's drain does"),
    "on_stop": Pin(why="called at the end of our drain, as arq's drain does"),
    "max_jobs": Pin(why="slots (read)"),
    "job_counter": Pin(why="running jobs (read; counted up by _start_claimed)"),
    "sem": Pin(why="slot semaphore (acquired by _start_claimed)"),
    "in_progress_timeout_s": Pin(why="how long the pick script's claim lasts"),
    "allow_pick_jobs": Pin(why="False once draining (read)"),
    "allow_abort_jobs": Pin(why="read"),
    "tasks": Pin(why="job id -> task, reaped in _poll_iteration"),
    "loop": Pin(why="the worker's event loop (signal handler schedules on it)"),
    "ctx": Pin(why="passed to every job; carries the Runtime under RUNTIME"),
}

# Keyword arguments of Worker.__init__ that build_worker passes.
INIT_KWARGS = (
    "functions",
    "queue_name",
    "redis_pool",
    "max_jobs",
    "job_timeout",
    "keep_result",
    "max_tries",
    "retry_jobs",
    "allow_abort_jobs",
    "job_serializer",
    "job_deserializer",
    "handle_signals",
    "job_completion_wait",
    "health_check_interval",
    "on_startup",
    "on_shutdown",
    "ctx",
    "poll_delay",
)


def seam_problems(
    worker_cls: type, instance: object | None = None, *, check_source: bool = True
) -> list[str]:
    """What no longer matches between ``ARQ_SEAM`` and ``worker_cls`` (arq's Worker), its
    ``__init__`` keywords included. Attributes set in ``__init__`` are looked up on
    ``instance`` when one is given."""
    init = getattr(worker_cls, "__init__", None)
    params = inspect.signature(init).parameters if init else {}
    problems = [f"__init__ lost keyword {k!r}" for k in INIT_KWARGS if k not in params]
    pins = {name: pin for name, pin in ARQ_SEAM.items() if name != "__init__"}
    return problems + seams.seam_problems(
        worker_cls, pins, library="arq", instance=instance, check_source=check_source
    )


class WakeableWorker(Worker):
    """arq's Worker, woken by pub/sub or a freed slot; see the module docstring."""

    def __init__(
        self, runtime: Runtime, *, wake_fallback_s: float, drain_s: float = 60.0, **kwargs: Any
    ) -> None:
        super().__init__(
            poll_delay=0,
            ctx={RUNTIME: runtime},
            on_startup=self._startup,
            on_shutdown=self._shutdown,
            **kwargs,
        )
        self.runtime = runtime
        self.background: list[asyncio.Task[None]] = []
        self._wake_event = asyncio.Event()
        self._wake_event.set()
        self._fallback_s = wake_fallback_s
        self._drain_s = drain_s  # DRAIN_TIMEOUT_S
        self._withdrawing: asyncio.Task[None] | None = None
        self._redis_failures = 0
        self.feeder = BatchFeeder(runtime)
        self._claims_checked = 0.0
        self._retry_timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        self._wake_event.set()

    async def _poll_iteration(self) -> None:
        """One turn of arq's loop. Redis errors are ridden out here: arq would end its main
        loop (and the process) on the first one; this backs off and tries again."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake_event.wait(), self._fallback_s)
        self._wake_event.clear()
        try:
            await self._turn()
        except (RedisError, OSError) as exc:
            stop_if_cancelled()
            if not self._redis_failures:
                logger.warning("Redis unreachable (%s); retrying with backoff", exc)
            self._redis_failures += 1
            await asyncio.sleep(min(_BACKOFF_MAX_S, 0.1 * 2**self._redis_failures))
            self.wake()
            return
        if self._redis_failures:
            logger.info("Redis reachable again after %d failed turn(s)", self._redis_failures)
            self._redis_failures = 0

    async def _turn(self) -> None:
        """After a wake-up: start waiting jobs in the free slots, then arq's own steps
        (aborts, finished tasks, its health key). Dead workers are reaped by the heartbeat."""
        free = min(self.max_jobs, self.runtime.capacity) - self.job_counter
        if self.allow_pick_jobs and free > 0:
            await self._fill(free)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                try:
                    task.result()  # as arq does: errors in run_job surface here
                except (RedisError, OSError) as exc:  # arq could not record the outcome
                    logger.warning("job %s: arq lost Redis while finishing it: %s", job_id, exc)
        await self.heart_beat()
        await self._requeue_lost_picks()

    async def _requeue_lost_picks(self) -> None:
        """Every CLAIM_CHECK_S: jobs this worker's picks claimed that it never started (the
        pick ran, its reply was lost: a failover, a dropped connection) go back to the
        queue. Claims younger than CLAIM_CHECK_S are left alone (a task about to start)."""
        now = self.loop.time()
        if now - self._claims_checked < CLAIM_CHECK_S:
            return
        self._claims_checked = now
        rt = self.runtime
        running = [*self.tasks, *rt.entered]
        requeued = await rt.store.workers.requeue_claims(
            rt.settings.worker_id, running, CLAIM_CHECK_S
        )
        if requeued:
            logger.warning("%d job(s) picked but never started went back to the queue", requeued)

    async def _fill(self, free: int) -> None:
        """Start waiting jobs of this worker's models in the ``free`` slots; slots still
        idle then take batch lines at once (fed now, not at the feeder's next tick), so a
        batch fills a model's idle capacity while interactive jobs, in higher bands, keep
        the first claim on every slot that frees."""
        rt = self.runtime
        if not rt.engine_ready:  # (a failed engine: its jobs went to other workers)
            return
        picked = await self._pick(free)
        idle = free - picked
        for _ in range(_FEED_ROUNDS):
            if idle <= 0 or not rt.engine_ready or not await self.feeder.fill(idle):
                return
            idle -= await self._pick(idle)

    async def _pick(self, limit: int) -> int:
        """Claim and start up to ``limit`` waiting jobs (cache-aware with PREFIX_AFFINITY);
        when the pick left jobs for warmer workers, look again once their wait runs out.
        Returns how many started."""
        rt = self.runtime
        result = await rt.store.routing.pick(
            rt.models, limit, self.in_progress_timeout_s, rt.settings.worker_id, rt.affinity
        )
        for job in result.jobs:
            if job.moves:  # a migrated job: continued from its log (worker.continuation)
                rt.resumed[job.id] = job.moves
            if rt.affinity:
                # For the job's span (read and removed when the job starts).
                if tracing.enabled() and len(rt.picks) < _PICKS_KEPT:
                    rt.picks[job.id] = (job.affinity, job.left_ms)
                rt.metrics.affinity.labels(job.affinity).inc()
            if job.left_ms >= 0:
                rt.metrics.affinity_wait.observe(job.left_ms / 1000)
        count_dropped(rt, result.dropped)
        if result.retry_ms >= 0:
            self._look_again(result.retry_ms / 1000)
        await self._start_claimed([(job.id, job.score) for job in result.jobs])
        return len(result.jobs)

    def _look_again(self, delay_s: float) -> None:
        """Wake the loop in ``delay_s`` (the earliest, when several are asked for)."""
        when = self.loop.time() + delay_s
        timer = self._retry_timer
        if timer is not None and not timer.cancelled() and self.loop.time() < timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._retry_timer = self.loop.call_at(when, self.wake)

    async def _start_claimed(self, picked: list[tuple[str, int]]) -> None:
        """arq's ``start_jobs`` for jobs the pick script already claimed: the same slot
        accounting and task, without its four round trips per job (WATCH, EXISTS, ZSCORE,
        MULTI/PSETEX/EXEC) between the wake-up and the engine request."""
        for job_id, score in picked:
            await self.sem.acquire()  # free: at most max_jobs - job_counter were picked
            self.job_counter += 1
            task = self.loop.create_task(self._run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _run_job(self, job_id: str, score: int) -> None:
        """arq's ``run_job``; then, for a job this worker handed over (its engine failed,
        or a drain), its queueing for the next worker: only once arq's end of the run
        (which deletes the payload and queue entry the next pick restores) is done."""
        rt = self.runtime
        try:
            await self.run_job(job_id, score)
        finally:
            spec = rt.migrating.pop(job_id, None)
            if spec is not None:
                try:
                    await asyncio.shield(rt.store.migration.resume(spec))
                except RedisError as exc:  # it holds its place until its deadline
                    logger.warning("job %s: handed over but not queued (Redis: %s)", job_id, exc)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.wake()  # a slot is free: look at the queue again now

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        # Stop advertising capacity at once so gateways stop admitting for this worker.
        for task in self.background:
            task.cancel()
        rt = self.runtime
        self._withdrawing = self.loop.create_task(
            rt.store.workers.remove_worker(rt.settings.worker_id)
        )
        self._withdrawing.add_done_callback(log_failure)
        if not rt.settings.migrations:
            super().handle_sig_wait_for_completion(signum)
            return
        # arq's drain, except that what still runs at DRAIN_TIMEOUT_S is handed over to
        # other workers (``queue.migration``) instead of cut.
        self.allow_pick_jobs = False
        logger.info("draining %d job(s), for at most %gs", len(self.tasks), self._drain_s)
        self.loop.create_task(self._drain(signal.Signals(signum)))

    async def _drain(self, signum: signal.Signals) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sleep_until_tasks_complete(), self._drain_s)
        rt = self.runtime
        running = [(i, t) for i, t in self.job_tasks.items() if not t.done()]
        if running:
            logger.info("drain timeout: handing %d job(s) over to other workers", len(running))
        for job_id, task in running:
            rt.giving_up[job_id] = "drain"
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sleep_until_tasks_complete(), HAND_OVER_WAIT_S)
        for task in self.tasks.values():
            if not task.done():
                task.cancel()
        if self.main_task:
            self.main_task.cancel()
        if self.on_stop:
            self.on_stop(signum)

    async def _startup(self, ctx: dict[str, Any]) -> None:
        rt = self.runtime
        await beat_once(rt)
        self.background = [
            asyncio.create_task(heartbeat_loop(rt), name="heartbeat"),
            asyncio.create_task(probe_loop(rt), name="engine-probe"),
            asyncio.create_task(wake_listener(rt, self.wake), name="wake-listener"),
            asyncio.create_task(self.feeder.run(), name="batch-feeder"),
        ]
        if rt.slots is not None:
            self.background.append(asyncio.create_task(slots_loop(rt, self.wake), name="slots"))
        if rt.settings.engine_stall_s and rt.settings.migrations:
            self.background.append(asyncio.create_task(stall_loop(rt), name="stall-watch"))
        for task in self.background:
            task.add_done_callback(log_failure)
        logger.info(
            "worker %s ready: %s slots, engine %s (%s)",
            rt.settings.worker_id,
            f"auto ({rt.capacity} to start, at most {rt.settings.max_active})"
            if rt.slots
            else rt.settings.max_active,
            rt.engine.base_url,
            "ready" if rt.engine_ready else "not ready",
        )

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        rt = self.runtime
        for task in self.background:
            await stop_task(task, 2.0, f"the {task.get_name()} task")
        await rt.store.workers.remove_worker(rt.settings.worker_id)
        await rt.embedder.aclose()
        await rt.engine.aclose()
        tracing.shutdown()  # what is still buffered goes out
        logger.info("worker %s stopped", rt.settings.worker_id)
