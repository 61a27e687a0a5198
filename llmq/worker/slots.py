"""``MAX_ACTIVE=auto``: a worker's slots sized to its engine, an adaptive concurrency limit.

An engine's time per output token (TPOT) grows with its running batch, and past its KV
memory it preempts (a preempted request's tokens stall while it is recomputed). The right
number of slots is the most the engine runs with its TPOT within TPOT_OBJECTIVE_MS, and it
moves with prompt and answer lengths. So the worker measures it, window by window
(``WINDOW_S``), from its own streams: each delta's gap to the one before, per token asked
for (``sample``), with the number of jobs running at the time. Then (``adjust``), in the
spirit of TCP's congestion control and Netflix's concurrency-limits:

- the engine preempted (its ``vllm:num_preemptions_total`` rose): the limit drops to
  ``BACKOFF`` of the jobs that ran (multiplicative decrease), and does not grow for
  ``HOLD_WINDOWS`` windows;
- TPOT above the objective: the limit drops to the load that would have met it
  (jobs running x objective / TPOT, at least one fewer than ran), so a limit that is still
  draining (more jobs running than it allows) is not cut again for the same excess;
- TPOT below the objective by more than ``HEADROOM`` while the slots were all in use: it
  grows, doubling until the first decrease (slow start), then by one per window (additive
  increase);
- otherwise it holds. A window with too few tokens (``MIN_TOKENS``) decides nothing.

The limit is between 1 and MAX_ACTIVE_CEILING; it starts at ``START``. The worker picks jobs
up to it, its heartbeat advertises it (the capacity gateways admit against, and the scaling
signal, follow), and ``worker_max_active`` shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 1.0
MIN_TOKENS = 20
HEADROOM = 0.1
BACKOFF = 0.7
HOLD_WINDOWS = 2
START = 4


@dataclass(frozen=True, slots=True)
class Window:
    """What one window measured."""

    tpot_s: float  # mean time per output token (0: too few tokens to say)
    running: float  # mean jobs running while its tokens came
    peak: int  # the most jobs running at once
    preempted: bool


class AdaptiveSlots:
    """The live slot limit of one worker (see the module docstring)."""

    def __init__(self, objective_s: float, ceiling: int, start: int = START) -> None:
        self.objective_s = objective_s
        self.ceiling = max(1, ceiling)
        self.limit = max(1, min(self.ceiling, start))
        self.slow_start = True
        self.last: Window | None = None
        self._hold = 0
        self._time = 0.0
        self._tokens = 0
        self._running = 0
        self._samples = 0
        self._peak = 0

    def sample(self, gap_s: float, tokens: int, running: int) -> None:
        """A streamed delta of ``tokens`` came ``gap_s`` after its stream's previous one,
        with ``running`` jobs on this worker."""
        self._time += gap_s
        self._tokens += tokens
        self._running += running
        self._samples += 1
        self._peak = max(self._peak, running)

    def busy(self, running: int) -> None:
        """``running`` jobs run now (the peak counts even without a token measured)."""
        self._peak = max(self._peak, running)

    def adjust(self, preempted: bool) -> int:
        """End the window: the new limit (``preempted``: the engine preempted in it)."""
        tokens, peak = self._tokens, self._peak
        tpot = self._time / tokens if tokens >= MIN_TOKENS else 0.0
        running = self._running / self._samples if self._samples else 0.0
        self.last = Window(tpot, running, peak, preempted)
        self._time, self._tokens, self._running, self._samples, self._peak = 0.0, 0, 0, 0, 0
        if self._hold:
            self._hold -= 1
        if preempted:
            self.slow_start = False
            self._hold = HOLD_WINDOWS
            self.limit = max(1, min(self.limit, math.floor(max(peak, 1) * BACKOFF)))
        elif tpot <= 0:
            pass
        elif tpot > self.objective_s:
            self.slow_start = False
            fits = math.floor(running * self.objective_s / tpot + 1e-9)
            self.limit = max(1, min(self.limit, fits, math.ceil(running) - 1))
        elif tpot < self.objective_s * (1 - HEADROOM) and peak >= self.limit and not self._hold:
            grown = self.limit * 2 if self.slow_start else self.limit + 1
            self.limit = min(self.ceiling, grown)
        return self.limit


def preemptions(metrics_text: str) -> float | None:
    """vLLM's ``vllm:num_preemptions_total`` (summed over its label sets) from its
    Prometheus text; None when the engine does not export it."""
    total, found = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith("vllm:num_preemptions_total"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                found = True
            except (IndexError, ValueError):
                continue
    return total if found else None
