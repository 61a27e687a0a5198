"""The worker's embedding merger (``worker.embeddings.Embedder``) against a fake engine the
test holds and releases: what is merged, how a refusal and a cancel are kept to their job."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import pytest

from llmq.shared.errors import UpstreamError
from llmq.shared.protocol import Api
from llmq.worker.embeddings import Embedder


def vec(text: str) -> str:
    return base64.b64encode(struct.pack("<2f", float(len(text)), 1.0)).decode()


class HeldEngine:
    """Answers each embeddings request when the test releases it; refuses an input "bad"."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def complete(self, body: dict[str, Any], api: Api) -> dict[str, Any]:
        assert api is Api.EMBEDDINGS
        self.bodies.append(body)
        await self.gate.wait()
        if "bad" in body["input"]:
            raise UpstreamError(400, "This model's maximum context length is 256 tokens.")
        data = [{"index": i, "embedding": vec(x)} for i, x in enumerate(body["input"])]
        data.reverse()  # the engine's order is its own: the index decides
        tokens = sum(len(x) for x in body["input"])
        return {"data": data, "usage": {"prompt_tokens": tokens}}


def body(*inputs: str, **options: Any) -> dict[str, Any]:
    return {"model": "m", "input": list(inputs), "encoding_format": "float", **options}


async def wait_requests(engine: HeldEngine, n: int) -> None:
    for _ in range(1000):  # the sender tasks run within a few loop turns
        if len(engine.bodies) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(engine.bodies)} engine requests, not {n}")


async def test_a_job_alone_goes_at_once_with_the_engines_own_count() -> None:
    engine = HeldEngine()
    emb = Embedder(engine, max_inputs=256)  # type: ignore[arg-type]
    assert await emb.embed(body("abc", "de")) == ([vec("abc"), vec("de")], 5)
    assert emb.requests == 1


async def test_jobs_that_wait_together_share_one_engine_request() -> None:
    engine = HeldEngine()
    engine.gate.clear()
    emb = Embedder(engine, max_inputs=256, in_flight=1)  # type: ignore[arg-type]
    first = asyncio.ensure_future(emb.embed(body("aa")))
    await wait_requests(engine, 1)  # out, held: the next jobs gather
    rest = [asyncio.ensure_future(emb.embed(body("b" * n, user=f"u{n}"))) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    assert len(engine.bodies) == 1
    engine.gate.set()
    answers = await asyncio.gather(first, *rest)
    assert [b["input"] for b in engine.bodies] == [["aa"], ["b", "bb", "bbb"]]
    assert engine.bodies[1]["encoding_format"] == "base64", "the engine is asked for base64"
    assert "user" not in engine.bodies[1], "client fields do not reach (or split) the request"
    assert [a[0] for a in answers] == [[vec("aa")], [vec("b")], [vec("bb")], [vec("bbb")]]
    # The merged request's exact 6 tokens, split by each job's estimate (1 token each).
    assert [a[1] for a in answers] == [2, 2, 2, 2]
    assert sum(a[1] for a in answers[1:]) == 6


async def test_different_options_or_input_sorts_never_share_a_request() -> None:
    engine = HeldEngine()
    engine.gate.clear()
    emb = Embedder(engine, max_inputs=256, in_flight=1)  # type: ignore[arg-type]
    ids = {"model": "m", "input": [[1, 2]]}
    jobs = [emb.embed(body("a")), emb.embed(body("b", dimensions=8)), emb.embed(ids),
            emb.embed(body("c", model="n"))]  # fmt: skip
    tasks = [asyncio.ensure_future(j) for j in jobs]
    await wait_requests(engine, 4)
    engine.gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(engine.bodies) == 4


async def test_a_refused_merged_request_is_sent_again_job_by_job() -> None:
    engine = HeldEngine()
    engine.gate.clear()
    emb = Embedder(engine, max_inputs=256, in_flight=1)  # type: ignore[arg-type]
    first = asyncio.ensure_future(emb.embed(body("x")))
    await wait_requests(engine, 1)
    good = asyncio.ensure_future(emb.embed(body("good")))
    bad = asyncio.ensure_future(emb.embed(body("bad")))
    also = asyncio.ensure_future(emb.embed(body("fine")))
    await asyncio.sleep(0)
    engine.gate.set()
    assert (await good)[0] == [vec("good")]
    assert (await also)[0] == [vec("fine")]
    with pytest.raises(UpstreamError) as refused:
        await bad
    assert refused.value.status == 400
    await first
    # x; the merged three, refused; then each of the three alone.
    assert [b["input"] for b in engine.bodies][1:] == [
        ["good", "bad", "fine"], ["good"], ["bad"], ["fine"],
    ]  # fmt: skip
    assert (await good)[1] == 4, "alone: the engine's own count"


async def test_a_cancelled_job_leaves_its_place_and_the_others_are_served() -> None:
    engine = HeldEngine()
    engine.gate.clear()
    emb = Embedder(engine, max_inputs=256, in_flight=1)  # type: ignore[arg-type]
    first = asyncio.ensure_future(emb.embed(body("x")))
    await wait_requests(engine, 1)
    gone = asyncio.ensure_future(emb.embed(body("gone")))
    kept = asyncio.ensure_future(emb.embed(body("kept")))
    await asyncio.sleep(0)
    gone.cancel()
    engine.gate.set()
    assert (await kept)[0] == [vec("kept")]
    await first
    assert [b["input"] for b in engine.bodies] == [["x"], ["kept"]]


async def test_a_request_holds_at_most_max_inputs_and_a_larger_job_goes_alone() -> None:
    engine = HeldEngine()
    engine.gate.clear()
    emb = Embedder(engine, max_inputs=3, in_flight=1)  # type: ignore[arg-type]
    first = asyncio.ensure_future(emb.embed(body("x")))
    await wait_requests(engine, 1)
    jobs = [asyncio.ensure_future(emb.embed(body(*inputs)))
            for inputs in (("a", "b"), ("c", "d"), ("e", "f", "g", "h"), ("i",))]  # fmt: skip
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(first, *jobs)
    assert [b["input"] for b in engine.bodies] == [
        ["x"], ["a", "b"], ["c", "d"], ["e", "f", "g", "h"], ["i"],
    ]  # fmt: skip


async def test_two_requests_go_out_at_once_before_any_job_waits() -> None:
    """IN_FLIGHT: with one request out, the next job still goes at once; with two out, the
    jobs that come gather for the next."""
    engine = HeldEngine()
    engine.gate.clear()
    emb = Embedder(engine, max_inputs=256)  # type: ignore[arg-type]
    tasks = [asyncio.ensure_future(emb.embed(body("a")))]
    await wait_requests(engine, 1)
    tasks.append(asyncio.ensure_future(emb.embed(body("b"))))
    await wait_requests(engine, 2)
    tasks += [asyncio.ensure_future(emb.embed(body(t))) for t in ("c", "d")]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert [b["input"] for b in engine.bodies] == [["a"], ["b"], ["c", "d"]]
    await emb.aclose()
