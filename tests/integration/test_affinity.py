"""Cache-aware pickup on real Redis and processes: two simulator engines with prefix caches,
a worker each, one gateway. A conversation's turns stay on the engine that served its first
turn, so every later turn finds its whole history cached; a warm worker that died costs a
turn at most the wait before another worker takes it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.prefix_cache import prompt_blocks, with_answer
from tests.support.clients import sim_stats
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.integration

MODEL = "sim-model"


@pytest.fixture(scope="module")
def engines(logdir: Path) -> Iterator[tuple[Proc, Proc]]:
    flags = ("--ttft-ms", "2", "--itl-ms", "1", "--tokens", "4", "--prefix-cache-tokens", "100000")
    a, b = start_sim(logdir, *flags), start_sim(logdir, *flags)
    yield a, b
    a.kill()
    b.kill()


@pytest.fixture
def pair(stack: Stack, engines: tuple[Proc, Proc]) -> tuple[Proc, Proc, Proc, Proc]:
    for e in engines:
        httpx.post(e.url + "/sim/reset").raise_for_status()
    w1 = stack.worker(vllm_url=engines[0].url, max_active=4)
    w2 = stack.worker(vllm_url=engines[1].url, max_active=4)
    gw = stack.gateway()
    wait_for(lambda: _slots(gw) == 8, 20, "both workers ready")
    return gw, w1, w2, *engines  # type: ignore[return-value]


def _slots(gw: Proc) -> int:
    health = httpx.get(gw.url + "/health").json()
    return int(health.get("capacity", 0))


def _turn(gw: Proc, conv: str, messages: list[dict[str, Any]]) -> str:
    """Send the conversation so far; returns the answer (the engine records ``conv``)."""
    body = {"model": MODEL, "messages": messages, "sim": {"tag": conv}}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _converse(gw: Proc, convs: list[str], turns: int) -> int:
    """Each conversation, turn by turn, one request at a time (every slot free when one
    arrives). Returns the tokens each turn after the first should find cached: the whole
    previous prompt and its answer."""
    history = {c: [{"role": "system", "content": f"You help {c}."}] for c in convs}
    cached = 0
    for t in range(turns):
        for c in convs:
            messages = history[c]
            messages.append({"role": "user", "content": f"{c}: question {t}"})
            answer = _turn(gw, c, messages)
            if t + 1 < turns:
                cached += sum(
                    n for _, n in with_answer(prompt_blocks(MODEL, messages, None), answer)
                )
            messages.append({"role": "assistant", "content": answer})
    return cached


def test_a_conversation_stays_on_the_engine_that_holds_it(
    pair: tuple[Proc, Proc, Proc, Proc, Proc],
) -> None:
    gw, _, _, a, b = pair
    convs = [f"c{i}" for i in range(6)]
    expected_hits = _converse(gw, convs, turns=4)
    tags = {e.url: set(sim_stats(e.url)["tags"]) for e in (a, b)}
    assert tags[a.url].isdisjoint(tags[b.url]), f"a conversation moved: {tags}"
    assert tags[a.url] | tags[b.url] == set(convs)
    hits = sum(sim_stats(e.url)["prefix_hits"] for e in (a, b))
    assert hits == expected_hits, "every later turn found its whole history cached"


def test_a_dead_warm_worker_holds_a_turn_no_longer_than_the_wait(
    pair: tuple[Proc, Proc, Proc, Proc, Proc],
) -> None:
    """Conversation x is warm on one worker; that worker is killed (its heartbeat still
    looks live for a while). The next turn is answered by the other engine."""
    gw, w1, w2, a, b = pair
    messages = [{"role": "system", "content": "You help x."}, {"role": "user", "content": "q0"}]
    messages.append({"role": "assistant", "content": _turn(gw, "x", messages)})
    warm = a if "x" in sim_stats(a.url)["tags"] else b
    cold = b if warm is a else a
    (w1 if warm is a else w2).signal(signal.SIGKILL)
    messages.append({"role": "user", "content": "q1"})
    _turn(gw, "x", messages)
    assert sim_stats(cold.url)["tags"] == ["x"]
