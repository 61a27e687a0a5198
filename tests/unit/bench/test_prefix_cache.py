"""The engine simulator's prefix cache: what the affinity tests and benchmark measure."""

from __future__ import annotations

import httpx

from bench.engine_sim import SimConfig, create_app
from bench.prefix_cache import PrefixCache, prompt_blocks, with_answer

SYSTEM = {"role": "system", "content": "Be brief."}


def chain(*texts: str) -> list[tuple[bytes, int]]:
    return prompt_blocks("m", [SYSTEM, *({"role": "user", "content": t} for t in texts)], None)


def test_a_prompt_hits_its_longest_cached_run_of_leading_blocks() -> None:
    cache = PrefixCache(10_000)
    first = chain("one")
    assert cache.lookup(first) == (0, sum(n for _, n in first))
    again = chain("one", "two")
    hit, total = cache.lookup(again)
    assert hit == sum(n for _, n in first)
    assert total == sum(n for _, n in again)
    other = chain("three")
    assert cache.lookup(other)[0] == first[0][1], "only the shared system prompt"


def test_eviction_takes_the_least_recent_chains_tail_first() -> None:
    a, b = chain("a" * 400), chain("b" * 400)  # ~100 tokens each past the system prompt
    cache = PrefixCache(sum(n for _, n in a) + 20)
    cache.lookup(a)
    cache.lookup(b)  # over capacity: a's tail goes, the shared head stays
    assert cache.size <= cache.capacity
    assert cache.lookup(a)[0] == a[0][1], "a's head (the system prompt) is still there"


def test_an_empty_cache_holds_nothing() -> None:
    cache = PrefixCache(0)
    cache.lookup(chain("x"))
    assert cache.lookup(chain("x"))[0] == 0


async def test_the_simulator_counts_hits_and_caches_its_answers() -> None:
    """Turn 2 holds turn 1's prompt and the answer the engine gave: all of it hits; only the
    new question is prefilled."""
    app = create_app(SimConfig(ttft_ms=0, itl_ms=0, tokens=3, prefix_cache_tokens=100_000))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        turn1 = [SYSTEM, {"role": "user", "content": "hi"}]
        r = await client.post(
            "/v1/chat/completions", json={"model": "sim-model", "messages": turn1}
        )
        answer = r.json()["choices"][0]["message"]
        turn2 = [*turn1, answer, {"role": "user", "content": "more"}]
        body = {"model": "sim-model", "messages": turn2, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as s:
            assert [line async for line in s.aiter_lines()][-2] == "data: [DONE]"
        stats = (await client.get("/sim/stats")).json()
        metrics = (await client.get("/metrics")).text
    cached = with_answer(prompt_blocks("sim-model", turn1, None), answer["content"])
    assert stats["prefix_hits"] == sum(n for _, n in cached)
    prompts = [prompt_blocks("sim-model", t, None) for t in (turn1, turn2)]
    assert stats["prefix_queries"] == sum(n for blocks in prompts for _, n in blocks)
    assert (
        f'vllm:prefix_cache_hits_total{{model_name="sim-model"}} {stats["prefix_hits"]}' in metrics
    )
