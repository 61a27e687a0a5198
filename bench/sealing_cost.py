"""What sealing (PAYLOAD_KEYS) costs one request, measured in this process: CPU µs to seal and
open its body, its kept messages and each of its events, and the bytes it adds in Redis and
on pub/sub. ``bench.durable`` prints it before its end-to-end runs (whose CPU per 1000
streams, with and without keys, shows the same cost among the rest)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial

from arq.jobs import serialize_job

from llmq.shared import protocol as p
from llmq.shared.sealing import Sealer, new_key, parse_keys

TOKENS = 64  # the benchmark's streams: 64 deltas, then DONE


def _chunk(i: int) -> bytes:
    """A delta as the worker publishes it (vLLM's shape, the job's id)."""
    return json.dumps(
        {
            "id": "chatcmpl-0123456789abcdef01234567",
            "object": "chat.completion.chunk",
            "created": 1764600000,
            "model": "qwen2.5-7b-instruct",
            "choices": [
                {"index": 0, "delta": {"content": f" word{i}"}, "logprobs": None,
                 "finish_reason": None}
            ],
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


def _spec(prompt_chars: int) -> p.JobSpec:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "x" * prompt_chars},
    ]
    return p.JobSpec(
        id="chatcmpl-0123456789abcdef01234567",
        model="qwen2.5-7b-instruct",
        stream=True,
        include_usage=True,
        enqueued_at_ms=1764600000000,
        tenant="team-a",
        body={"model": "qwen2.5-7b-instruct", "messages": messages, "stream": True},
    )


def _payload(spec: p.JobSpec) -> bytes:
    """arq's job payload, as Jobs.admit writes it."""
    args = (spec.model_dump(mode="json"),)
    return serialize_job(p.JOB_FUNCTION, args, {}, 1, 0, serializer=p.json_dumps)


def _us(fn: Callable[[], object], seconds: float = 0.3) -> float:
    """µs per call (the best of three timed loops of about ``seconds`` each)."""
    n, best = 1, float("inf")
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - t0
        if took >= seconds / 10:
            break
        n *= 4
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def print_sealing_cost() -> None:
    s = Sealer(parse_keys(new_key()))
    chunk = _chunk(7)
    sealed_chunk = s.seal_event("j", chunk)
    print(f"Sealing (AES-256-GCM, {TOKENS}-token streams; µs measured here, one core)")
    print(f"{'prompt chars':>12} {'body µs seal/open':>17} {'event µs seal/open':>18} "
          f"{'µs/request gw':>13} {'worker':>7} {'job bytes':>15} {'event bytes':>11}")  # fmt: skip
    for chars in (200, 4_000, 32_000):
        spec = _spec(chars)
        sealed_spec = s.seal_spec(spec)
        body_seal = _us(partial(s.seal_spec, spec))
        body_open = _us(partial(s.open_spec, sealed_spec))
        ev_seal = _us(lambda: s.seal_event("j", chunk))
        ev_open = _us(lambda: s.open(sealed_chunk, "event:j"))
        events = TOKENS + 1  # the deltas and DONE (STARTED stays plain)
        gateway = body_seal + events * ev_open
        worker = body_open + events * ev_seal
        plain, sealed = len(_payload(spec)), len(_payload(sealed_spec))
        print(
            f"{chars:>12} {body_seal:>8.1f}/{body_open:<8.1f} {ev_seal:>9.2f}/{ev_open:<8.2f} "
            f"{gateway:>13.0f} {worker:>7.0f} {plain:>6}->{sealed:<7} "
            f"{len(chunk):>4}->{len(sealed_chunk):<5}"
        )
    messages = json.dumps(_spec(4_000).body["messages"])
    kept = _us(lambda: s.seal_text(messages, "messages:j"))
    print(
        f"store: true also seals the kept messages once ({kept:.1f} µs at 4000 characters, "
        f"{len(s.seal_text(messages, 'messages:j')) - len(messages)} bytes more); its logged "
        "events are the published ones, sealed once"
    )


if __name__ == "__main__":
    print_sealing_cost()
