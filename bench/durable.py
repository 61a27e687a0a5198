"""What ``store: true`` and sealed payloads cost: CPU per 1000 streams, Redis bytes per
stored completion, how fast a finished stream is resumed, and CPU µs and bytes of sealing.

    python -m bench.durable [--conc 16,64] [--rounds 3] [--requests 384] [--keys both]

First, in this process, what sealing (PAYLOAD_KEYS, ``llmq.shared.sealing``) costs one
request: µs to seal and open its body and each of its events, and the bytes it adds.

Then, for each key setting (``--keys``: ``none`` = PAYLOAD_KEYS=none, ``sealed`` = a key,
``both``), it starts redis-server, the engine simulator (TTFT 20 ms, ITL 5 ms, 64-token
streams), one worker and one gateway on loopback (as ``bench.scale``). For each concurrency c
it streams the same requests without and with ``store: true``, in alternating batches, and
prints throughput, TTFT p50 and the CPU seconds per 1000 streams of the gateway, the worker
and Redis for both. Then it stores one completion of 64 and one of 1000 tokens and prints
the Redis memory they hold (``MEMORY USAGE`` of the record and the log), and times a resume
of the 1000-token one from its start after it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx
from redis import Redis

from bench.loadgen import RunResult, merge, run
from bench.processes import Proc, local_stack
from bench.sealing_cost import print_sealing_cost
from llmq.shared.queue import names
from llmq.shared.sealing import new_key

BODY: dict[str, Any] = {
    "model": "sim-model",
    "stream": True,
    "messages": [{"role": "user", "content": "Say something."}],
    "stream_options": {"include_usage": True},  # tokens from the usage, however batched
}
STORED = {**BODY, "store": True}


def measure(
    c: int, n: int, rounds: int, url: str, procs: dict[str, Proc]
) -> dict[bool, tuple[RunResult, dict[str, float]]]:
    """For plain and stored streams: the merged run and CPU-s per 1000 streams by process."""
    out: dict[bool, tuple[list[RunResult], dict[str, float]]] = {
        s: ([], dict.fromkeys(procs, 0.0)) for s in (False, True)
    }
    for _ in range(rounds):
        for stored in (False, True):
            runs, cpu = out[stored]
            before = {k: proc.cpu_seconds() for k, proc in procs.items()}
            runs.append(asyncio.run(run(url, STORED if stored else BODY, n // rounds, c)))
            for k, proc in procs.items():
                cpu[k] += proc.cpu_seconds() - before[k]
    done = rounds * (n // rounds)
    return {
        s: (merge(runs), {k: v * 1000 / done for k, v in cpu.items()})
        for s, (runs, cpu) in out.items()
    }


def stored_bytes(url: str, rdb: Any, tokens: int) -> tuple[str, int, int]:
    """Store one completion of ``tokens`` tokens: (its id, Redis bytes, logged events)."""
    body = {**STORED, "sim": {"tokens": tokens}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as resp:
        job_id = ""
        for line in resp.iter_lines():
            if line.startswith("data: {") and not job_id:
                job_id = line.split('"id":"', 1)[1].split('"', 1)[0]
    time.sleep(0.2)  # the worker writes the record's final status just after [DONE]
    stored_keys = (names.stored_key(job_id), names.log_key(job_id))
    size: int = sum(int(rdb.memory_usage(k, samples=0) or 0) for k in stored_keys)
    return job_id, size, int(rdb.xlen(names.log_key(job_id)))


def resume_ms(url: str, job_id: str) -> float:
    t0 = time.perf_counter()
    with httpx.stream(
        "GET", f"{url}/v1/chat/completions/{job_id}", params={"stream": "true"}, timeout=60
    ) as resp:
        for _ in resp.iter_lines():
            pass
    return (time.perf_counter() - t0) * 1000


def run_stack(a: argparse.Namespace, concs: list[int], payload_keys: str) -> None:
    sim_args = ("--ttft-ms", "20", "--itl-ms", "5", "--tokens", "64")
    settings = {
        "max_active": max(concs),
        "queue_max": max(concs),
        "log_level": "WARNING",
        "payload_keys": payload_keys,
    }
    with local_stack("llmq-durable-", sim_args, **settings) as stack:
        url = stack.gateway.url
        procs = {"gateway": stack.gateway, "worker": stack.worker, "redis": stack.redis}
        asyncio.run(run(url, STORED, 40, 8))  # warm-up
        sealed = "sealed" if payload_keys != "none" else "PAYLOAD_KEYS=none"
        print(
            f"\n64-token streams (simulator TTFT 20 ms, ITL 5 ms), plain vs store: true; {sealed}"
        )
        print(
            f"{'c':>4} {'kind':>6} {'r/s':>7} {'ttft p50 ms':>11} "
            f"{'CPU-s/1k: gw':>12} {'worker':>7} {'redis':>6} {'total':>6} {'err':>4}"
        )
        for c in concs:
            n = a.requests - a.requests % a.rounds
            for stored, (res, cpu) in measure(c, n, a.rounds, url, procs).items():
                errors = sum(1 for s in res.samples if not s.ok or s.tokens != 64)
                print(
                    f"{c:>4} {'store' if stored else 'plain':>6} {res.req_per_s:>7.1f} "
                    f"{res.pct('ttft_s', 50) * 1000:>11.1f} {cpu['gateway']:>12.2f} "
                    f"{cpu['worker']:>7.2f} {cpu['redis']:>6.2f} {sum(cpu.values()):>6.2f} "
                    f"{errors:>4}"
                )
        rdb = Redis(port=stack.redis.port)
        for tokens in (64, 1000):
            job_id, size, events = stored_bytes(url, rdb, tokens)
            print(
                f"stored {tokens}-token completion: {size} bytes in Redis "
                f"({events} logged events, {size / events:.0f} bytes each)"
            )
        took = resume_ms(url, job_id)
        print(f"resume of the 1000-token completion from its start: {took:.1f} ms")
        rdb.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=384, help="per kind at each c")
    ap.add_argument("--keys", choices=("none", "sealed", "both"), default="both")
    a = ap.parse_args(argv)
    concs = [int(c) for c in a.conc.split(",")]
    print_sealing_cost()
    modes = {"none": ["none"], "sealed": [new_key()], "both": ["none", new_key()]}[a.keys]
    for payload_keys in modes:
        run_stack(a, concs, payload_keys)


if __name__ == "__main__":
    main()
