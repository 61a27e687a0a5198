"""Fleets on real Redis and processes: two simulator engines serving different model names
(one with an extra served name and a LoRA adapter), a worker per engine, two gateways."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.support.clients import assert_drained, body, release, sim_stats, stream_chat, wait_held
from tests.support.stack import Proc, Stack, start_sim, wait_for

pytestmark = pytest.mark.integration

ALPHA, BETA, BETA_NAME, BETA_LORA = "alpha", "beta", "beta-chat", "beta-lora"
ALIASES = json.dumps({"gpt-4o-mini": ALPHA})


@pytest.fixture(scope="module")
def sims(logdir: Path) -> Iterator[tuple[Proc, Proc]]:
    fast = ("--ttft-ms", "5", "--itl-ms", "2", "--tokens", "4")
    a = start_sim(logdir, "--model", ALPHA, *fast)
    b = start_sim(logdir, "--model", f"{BETA},{BETA_NAME}", "--adapters", BETA_LORA, *fast)
    yield a, b
    a.kill()
    b.kill()


@pytest.fixture
def fleet(stack: Stack, sims: tuple[Proc, Proc]) -> tuple[Stack, Proc, Proc]:
    for s in sims:
        httpx.post(s.url + "/sim/reset").raise_for_status()
    return stack, *sims


def chat(model: str, stream: bool = False, **sim: Any) -> dict[str, Any]:
    return body(stream=stream, model=model, **sim)


def workers(stack: Stack, a: Proc, b: Proc, **settings: object) -> tuple[Proc, Proc]:
    wa = stack.worker(vllm_url=a.url, **settings)
    wb = stack.worker(vllm_url=b.url, **settings)
    return wa, wb


def wait_models(gw: Proc, *models: str) -> None:
    def served() -> bool:
        ids = {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
        return set(models) <= ids

    wait_for(served, 30, f"the gateway to list {models}")


def metrics(gw: Proc) -> str:
    return httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text


def test_mixed_requests_reach_only_their_models_engines(fleet: tuple[Stack, Proc, Proc]) -> None:
    """200 requests over two gateways, for four served names and an alias: each engine sees
    only its own models, never a 404; the alias answers as its model."""
    stack, a, b = fleet
    workers(stack, a, b, max_active=8)
    gws = [stack.gateway(model_aliases=ALIASES) for _ in range(2)]
    for gw in gws:
        wait_models(gw, ALPHA, BETA, BETA_NAME, BETA_LORA, "gpt-4o-mini")
    names = [ALPHA, BETA, BETA_NAME, BETA_LORA, "gpt-4o-mini"]
    asked = [names[i % len(names)] for i in range(200)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            sem = asyncio.Semaphore(24)

            async def one(i: int, model: str) -> httpx.Response:
                async with sem:
                    url = gws[i % 2].url + "/v1/chat/completions"
                    return await c.post(url, json=chat(model, stream=bool(i % 3 == 0)))

            return await asyncio.gather(*(one(i, m) for i, m in enumerate(asked)))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 200
    for model, r in zip(asked, answers, strict=True):
        if r.headers["content-type"].startswith("application/json"):
            assert r.json()["model"] == (ALPHA if model == "gpt-4o-mini" else model)
    sa, sb = sim_stats(a.url), sim_stats(b.url)
    assert sa["not_found"] == sb["not_found"] == 0
    assert sa["by_model"] == {ALPHA: 80}, "alpha's own 40 and the alias' 40"
    assert sb["by_model"] == {BETA: 40, BETA_NAME: 40, BETA_LORA: 40}
    listed = {m["id"]: m for m in httpx.get(gws[0].url + "/v1/models").json()["data"]}
    assert listed[BETA_LORA]["parent"] == BETA
    assert listed[BETA]["owned_by"] == "sim"
    assert listed["gpt-4o-mini"]["root"] == ALPHA
    assert "parent" not in listed[ALPHA]
    text = metrics(gws[0])
    for model in (ALPHA, BETA, BETA_NAME, BETA_LORA):
        assert f'api_capacity_slots{{model="{model}"}} 8.0' in text
        assert f'api_model_ready_workers{{model="{model}"}} 1.0' in text
        assert f'api_queue_depth{{model="{model}"}}' in text
        assert f'api_model_desired_workers{{model="{model}"}}' in text
    assert 'api_admissions_total{model="alpha"}' in text
    assert 'api_time_to_first_token_seconds_bucket{le="+Inf",model="alpha"}' in text
    assert "gpt-4o-mini" not in text.split("# HELP api_admissions")[1], "aliases resolve"


def test_a_saturated_model_refuses_while_another_is_served(
    fleet: tuple[Stack, Proc, Proc], rdb: redis.Redis
) -> None:
    """Reject mode: alpha's one slot held, alpha gets 429 server_busy; beta still 200."""
    stack, a, b = fleet
    workers(stack, a, b, max_active=1)
    gw = stack.gateway(queue_mode="reject")
    wait_models(gw, ALPHA, BETA)

    async def scenario() -> tuple[Any, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            held = asyncio.create_task(stream_chat(c, gw.url, chat(ALPHA, True, hold="a")))
            await asyncio.to_thread(wait_held, a.url, "a", 1)
            busy = await c.post(gw.url + "/v1/chat/completions", json=chat(ALPHA))
            other = await c.post(gw.url + "/v1/chat/completions", json=chat(BETA))
            await asyncio.to_thread(release, a.url, "a")
            return await held, busy, other

    held, busy, other = asyncio.run(scenario())
    assert held.done
    assert busy.status_code == 429
    assert busy.json()["error"]["code"] == "server_busy"
    assert "`alpha`" in busy.json()["error"]["message"]
    assert other.status_code == 200
    text = metrics(gw)
    assert 'api_rejections_total{model="alpha",reason="server_busy"} 1.0' in text
    assert 'api_rejections_total{model="beta",reason="server_busy"}' not in text
    assert_drained(rdb)


def test_a_models_only_worker_dying_leaves_other_models_served(
    fleet: tuple[Stack, Proc, Proc],
) -> None:
    """beta's worker killed: its running job ends worker_lost, beta answers 503
    engine_unavailable (known, not 404), alpha answers 200, an unknown model 404."""
    stack, a, b = fleet
    _, wb = workers(stack, a, b, heartbeat_interval_s=0.3)
    gw = stack.gateway()
    wait_models(gw, ALPHA, BETA)

    async def scenario() -> Any:
        async with httpx.AsyncClient(timeout=60) as c:
            running = asyncio.create_task(stream_chat(c, gw.url, chat(BETA, True, hold="b")))
            await asyncio.to_thread(wait_held, b.url, "b", 1)
            wb.popen.send_signal(signal.SIGKILL)
            return await running

    lost = asyncio.run(scenario())
    assert [e["code"] for e in lost.sse_errors] == ["worker_lost"]
    wait_for(
        lambda: (
            httpx.get(gw.url + "/v1/models").json()["data"]
            and BETA not in {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
        ),
        30,
        "beta to leave /v1/models",
    )
    gone = httpx.post(gw.url + "/v1/chat/completions", json=chat(BETA), timeout=30)
    assert gone.status_code == 503
    assert gone.json()["error"]["code"] == "engine_unavailable"
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat(ALPHA), timeout=30).is_success
    unknown = httpx.post(gw.url + "/v1/chat/completions", json=chat("nope"), timeout=30)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    release(b.url, "b")


def _line(custom_id: str, model: str, **sim: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": chat(model, **sim)}  # fmt: skip


def _submit(client: openai.OpenAI, lines: list[dict[str, Any]]) -> Any:
    raw = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def _finished(client: openai.OpenAI, batch_id: str, within: float = 60) -> Any:
    wait_for(
        lambda: client.batches.retrieve(batch_id).status == "completed",
        within,
        f"batch {batch_id} to complete",
    )
    return client.batches.retrieve(batch_id)


def test_a_batch_naming_two_models_is_answered_line_by_line_by_each(
    fleet: tuple[Stack, Proc, Proc], sdk: Any
) -> None:
    stack, a, b = fleet
    workers(stack, a, b)
    gw = stack.gateway(model_aliases=ALIASES)
    wait_models(gw, ALPHA, BETA)
    client = sdk(gw.url)
    models = [ALPHA, BETA, "gpt-4o-mini", BETA_LORA]
    lines = [_line(f"r{i}", models[i % 4]) for i in range(40)]
    done = _finished(client, _submit(client, lines).id)
    assert (done.request_counts.completed, done.request_counts.failed) == (40, 0)
    assert done.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    answered = {o["custom_id"]: o["response"]["body"]["model"] for o in out}
    for i in range(40):
        want = models[i % 4]
        assert answered[f"r{i}"] == (ALPHA if want == "gpt-4o-mini" else want)
    assert sim_stats(a.url)["by_model"] == {ALPHA: 20}
    assert sim_stats(b.url)["by_model"] == {BETA: 10, BETA_LORA: 10}


def test_a_batch_keeps_a_models_idle_slots_busy(fleet: tuple[Stack, Proc, Proc], sdk: Any) -> None:
    """16 idle slots, 96 lines of 1 s each: while lines remain for every slot, at least 90 %
    of the slots run one (sampled from the engine). Lines are fed as slots free up (woken),
    not at the feeder's tick: BATCH_FEED_S is 30 s here."""
    stack, a, _ = fleet
    slots, total = 16, 96
    stack.worker(vllm_url=a.url, max_active=slots, batch_feed_s=30)
    gw = stack.gateway()
    wait_models(gw, ALPHA)
    client = sdk(gw.url)
    batch = _submit(client, [_line(f"r{i}", ALPHA, ttft_ms=1000, tokens=1) for i in range(total)])
    samples: list[int] = []
    deadline = time.monotonic() + 60
    started = False
    while time.monotonic() < deadline:
        running = int(sim_stats(a.url)["running"])
        counts = client.batches.retrieve(batch.id).request_counts
        finished = counts.completed + counts.failed
        started = started or running > 0
        if started and finished < total - 2 * slots:  # lines remain for every slot
            samples.append(running)
        if finished >= total - 2 * slots and started:
            break
        time.sleep(0.05)
    assert len(samples) >= 10, samples
    busy = sum(samples) / (len(samples) * slots)
    assert busy >= 0.9, f"{busy:.0%} of the slots busy: {Counter(samples)}"
    done = _finished(client, batch.id)
    assert done.request_counts.completed == total
