"""The simulator's engine under load: what makes scheduling measurable on it.

A real engine (vLLM) runs its requests in one batch, a step per output token for all of
them, so its time per output token grows with the batch; it holds each request's KV cache
(prompt and answer so far) in a fixed memory, and when a step does not fit it *preempts* the
most recently started request (frees its cache; the request waits, then recomputes its
prompt and answer before its next token); a new request waits (``num_requests_waiting``)
until its prompt fits and nothing preempted is waiting first. ``LoadModel`` does that for
the simulator's streams:

- ``itl_curve``: the time between tokens by running requests, points ``running:ms``
  joined by straight lines (and the last segment's slope beyond): ``"1:10,8:14,32:30"``;
- ``kv_tokens``: the budget in tokens (0: none, nothing waits or is preempted);
- ``prefill_us_per_token``: a preempted request's recompute (prompt + answer so far)
  costs this per token, as a new prompt's prefill does (``engine_sim._prefill``);
- prefills (a new request's time to first token, a recompute) run ``prefill_parallel`` at a
  time (``prefill``; 1 by default), each slowed as the batch's steps are (``prefill_s``):
  the engine's compute is shared, so a request's first token waits for the prefills before
  it and for the running batch, as on vLLM's CPU build (``bench.engine_curve`` compares
  them; a GPU engine batches many prompts into one step: a higher ``prefill_parallel``).

``preemptions`` and ``waiting`` are what the simulator's ``/metrics`` exports under vLLM's
names (``vllm:num_preemptions_total``, ``vllm:num_requests_waiting``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field


def parse_curve(text: str) -> list[tuple[float, float]]:
    """``"1:10,8:14"`` -> [(1, 10.0), (8, 14.0)], sorted by running count."""
    points = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        running, _, ms = part.partition(":")
        points.append((float(running), float(ms)))
    if not points:
        return []
    points.sort()
    return points


def curve_ms(points: list[tuple[float, float]], running: float) -> float:
    """The time between tokens (ms) at ``running`` requests, on the piecewise-linear curve."""
    if len(points) == 1:
        return points[0][1]
    if running <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if running <= x1:
            return y0 + (y1 - y0) * (running - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (running - x1) / (x1 - x0)


@dataclass(eq=False)
class Seq:
    """One request in the engine."""

    order: int  # when it started (preemption takes the latest)
    prompt: int
    tokens: int = 0  # answer tokens made
    preempted: bool = False
    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    resumed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def size(self) -> int:
        return self.prompt + self.tokens


class LoadModel:
    def __init__(
        self, curve: str, kv_tokens: int, prefill_us_per_token: float, prefill_parallel: int = 1
    ) -> None:
        self.points = parse_curve(curve)
        self.kv_tokens = kv_tokens
        self.prefill_us = prefill_us_per_token
        self.running: dict[int, Seq] = {}  # in start order
        self.queued: collections.deque[Seq] = collections.deque()  # new, waiting to fit
        self.preempted_queue: collections.deque[Seq] = collections.deque()
        self.used = 0
        self.preemptions = 0
        self._order = itertools.count()
        self.prefill = asyncio.Semaphore(max(1, prefill_parallel))

    @property
    def active(self) -> bool:
        """Whether it models anything (else the simulator keeps its fixed timings)."""
        return bool(self.points) or self.kv_tokens > 0

    @property
    def waiting(self) -> int:
        return len(self.queued) + len(self.preempted_queue)

    def itl_s(self, fixed_s: float | None, default_s: float) -> float:
        """The gap before the next token: a request's own (``fixed_s``), the curve's at the
        running batch, or the default."""
        if fixed_s is not None:
            return fixed_s
        if self.points:
            return curve_ms(self.points, max(1, len(self.running))) / 1000
        return default_s

    def join(self, prompt: int) -> Seq:
        """A new request: it runs (``admitted`` is set) once its prompt fits, after what
        waits before it; ``leave`` it however it ends."""
        seq = Seq(next(self._order), prompt)
        self.queued.append(seq)
        self._admit()
        return seq

    def leave(self, seq: Seq) -> None:
        """It finished (or its client left): its cache is freed."""
        if seq in self.queued:
            self.queued.remove(seq)
        elif seq in self.preempted_queue:
            self.preempted_queue.remove(seq)
        elif self.running.pop(seq.order, None) is not None:
            self.used -= seq.size
        self._admit()

    async def prefill_for(self, base_s: float) -> None:
        """A prefill of ``base_s`` (its time alone), after the prefills before it, slowed by
        the running batch as its steps are."""
        async with self.prefill:
            await asyncio.sleep(self.prefill_s(base_s))

    def prefill_s(self, base_s: float) -> float:
        if not self.points:
            return base_s
        alone = curve_ms(self.points, 1)
        return base_s * curve_ms(self.points, max(1, len(self.running))) / alone

    async def gap(self, seq: Seq, fixed_s: float | None, default_s: float) -> None:
        """Wait for ``seq``'s next token: stalled while preempted (then its recompute), then
        one step at the batch's pace; the token takes cache, which may preempt the latest."""
        while seq.preempted:
            await seq.resumed.wait()
            await self.prefill_for(seq.size * self.prefill_us / 1e6)
        await asyncio.sleep(self.itl_s(fixed_s, default_s))
        if seq.preempted:  # preempted while it waited: the token comes after its recompute
            await self.gap(seq, fixed_s, default_s)
            return
        seq.tokens += 1
        self.used += 1
        self._fit()

    def _fits(self, seq: Seq) -> bool:
        return self.kv_tokens <= 0 or not self.running or self.used + seq.size <= self.kv_tokens

    def _fit(self) -> None:
        """Over the budget: preempt the latest started until it fits (one always runs)."""
        while self.kv_tokens > 0 and self.used > self.kv_tokens and len(self.running) > 1:
            latest = self.running.pop(max(self.running))
            self.used -= latest.size
            latest.preempted = True
            latest.resumed.clear()
            self.preempted_queue.append(latest)
            self.preemptions += 1

    def _admit(self) -> None:
        """Freed cache goes to the preempted first (oldest first), then to new requests."""
        while self.preempted_queue and self._fits(self.preempted_queue[0]):
            seq = self.preempted_queue.popleft()
            self.running[seq.order] = seq
            self.used += seq.size
            seq.preempted = False
            seq.resumed.set()
        while not self.preempted_queue and self.queued and self._fits(self.queued[0]):
            seq = self.queued.popleft()
            self.running[seq.order] = seq
            self.used += seq.size
            seq.admitted.set()
