"""Where a process's CPU goes while a load runs: py-spy for the Python processes, Redis' own
``INFO commandstats`` for Redis (what ``bench.scale --profile`` prints).

py-spy samples each process's stacks (``record --format raw``: one line per distinct stack,
``frame;frame;...;leaf count``); the summary gives each function's share of the samples it
was running in (``self``: the leaf) and under (``total``: anywhere on the stack). Needs
py-spy (a dev dependency) and the right to trace (root, or ptrace_scope 0).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import redis

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def sampled(pids: dict[str, int], outdir: Path, rate: int = 250) -> Iterator[dict[str, Path]]:
    """py-spy records each of ``pids`` (name -> pid, children included) while the block
    runs; yields name -> the raw output file, written when the block ends."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    outdir.mkdir(parents=True, exist_ok=True)
    files = {name: outdir / f"{name}.txt" for name in pids}
    procs = []
    for name, pid in pids.items():
        argv = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                "--subprocesses", "--nonblocking", "--output", str(files[name])]  # fmt: skip
        with (outdir / f"{name}.log").open("wb") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield files
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``module.py:func`` (the path's last two parts)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = Path(m["file"])
    where = "/".join(path.parts[-2:]) if path.parts else m["file"]
    return f"{where}:{m['func']}"


def summarize(raw: Path, top: int = 12) -> list[str]:
    """The ``top`` functions by self and by total share of a py-spy raw profile."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            under[f] += n
    if not samples:
        return ["(no samples)"]
    lines = [f"{samples} samples; self:"]
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("total (on the stack):")
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in under.most_common(top)]
    return lines


def redis_commands(client: redis.Redis, top: int = 10) -> list[str]:
    """Redis' time per command since its last ``CONFIG RESETSTAT``, most first."""
    stats: dict[str, dict[str, float]] = client.info("commandstats")  # type: ignore[assignment]
    rows = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
    total = sum(v["usec"] for v in stats.values()) or 1
    lines = [f"{total / 1e6:.2f} s in commands; by command:"]
    for name, v in rows[:top]:
        lines.append(f"  {v['usec'] / total:6.1%}  {name.removeprefix('cmdstat_'):<14} "
                     f"{int(v['calls']):>8} calls  {v['usec_per_call']:>7.1f} µs/call")  # fmt: skip
    return lines
