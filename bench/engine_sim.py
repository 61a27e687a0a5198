"""OpenAI-compatible engine simulator, streaming the way vLLM does.

    python -m bench.engine_sim --port 8000 --ttft-ms 20 --itl-ms 10

A stream is: role chunk with the first token, one chunk per token (with vLLM's per-request
``stream_interval`` N: one per N tokens after the first), a finish chunk, a usage chunk
(when ``stream_options.include_usage``), ``data: [DONE]``. Knobs are global (flags) and
per request through an extra body field ``"sim": {...}`` (the gateway passes unknown fields
through), e.g. ``{"sim": {"tokens": 5, "itl_ms": 50, "fail_status": 500, "hang": true,
"drop_after": 3, "pad": 4000}}`` (``pad``: bytes added to each token, for big
streams). ``GET /sim/stats`` counts streams started, completed and abandoned by
the client (the check that cancellation reaches the engine); ``POST /sim/reset`` zeroes them.

Holds let a test decide when a job ends instead of racing durations:
``{"sim": {"hold": "a"}}`` streams ``hold_after`` tokens (default 1; 0 holds before the
first one, a non-streamed answer holds before it is sent) and then waits until
``POST /sim/release/a`` (the rest of the stream follows) or ``POST /sim/fail/a`` (the stream
breaks off, as an engine crash would). ``GET /sim/stats`` shows ``held`` per name, so a
test polls for "held" instead of sleeping. A release or fail that comes first is kept: a
later hold of that name passes (or fails) at once. ``POST /sim/reset`` forgets them.
``{"sim": {"tool_call": {"name": "f", "arguments": "{...}"}}}`` answers with that function
call (streamed as vLLM does: the call, then its arguments in two pieces, finish reason
``tool_calls``) instead of text, until the conversation holds a tool's output (an agent's
loop: call, then answer). ``{"sim": {"record": "r"}}`` keeps the request's messages,
tools and ``traceparent`` header under ``recorded["r"]`` of ``/sim/stats`` (what a test
checks the engine got).
``--embed-dim N`` makes it an embedding engine (vLLM's pooling runner): ``/v1/embeddings``
answers a deterministic unit vector per input (``sim_vector``; base64 or floats;
``dimensions`` with ``--matryoshka``), and chat and completions are a bare 404; ``/sim/stats``
counts its requests, inputs and the most inputs in one request (``embed_*``: what merging
jobs into one engine request does). A generative engine also serves legacy
``/v1/completions`` (a prompt answered as chat's, in ``text_completion`` chunks).
``{"sim": {"tag": "x"}}`` records "x" in ``tags`` of ``/sim/stats``, in the order requests
reached the engine (what the priority and fairness tests read).

Continuation, as vLLM's: a chat request with ``continue_final_message: true`` whose last
message is the assistant's answer so far ("tok0 tok1 ... tok4 ") goes on from the next token
("tok5 "), as if it had never stopped: the same text in the end, ``max_tokens`` counted
from there; its prompt counts the answer so far, one token a word. ``POST /tokenize``
counts a prompt as the usage does (chat ``messages`` with ``continue_final_message``, or a
``prompt``). ``POST /sim/sick`` makes the engine fail as a dead vLLM engine core does
(every generation a 500, ``/health`` a 500; ``/v1/models`` still answers), ``POST
/sim/well`` ends that.

``--itl-curve "1:10,8:14,32:30"`` makes the time between tokens grow with the running batch,
``--kv-tokens N`` gives it a KV cache budget (the latest request is preempted beyond it, and
stalls until recomputed; new ones wait), and ``--prefill-us-per-token`` makes prefill grow
with the prompt (``bench.sim_load``); ``/metrics`` exports vLLM's ``num_requests_waiting``
and ``num_preemptions_total``.

``--prefix-cache-tokens N`` gives the engine a prefix cache (``bench.prefix_cache``: an LRU
of prompt blocks, answers included) and ``--prefill-us-per-token`` the time each prompt token
it does not hold adds to the first token; ``/sim/stats`` and ``/metrics`` count the tokens
looked up and found (``prefix_queries``, ``prefix_hits``; vLLM's
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import math
import random
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.prefix_cache import PrefixCache, prompt_blocks, with_answer
from bench.sim_holds import DroppedStream, Holds
from bench.sim_load import LoadModel
from bench.sim_stats import SimStats


@dataclass
class SimConfig:
    model: str = "sim-model"  # served names, comma-separated (vLLM's --served-model-name)
    adapters: str = ""  # LoRA adapters, comma-separated: listed with parent = the first name
    ttft_ms: float = 20.0
    itl_ms: float = 10.0
    tokens: int = 64
    max_model_len: int = 4096
    fail_rate: float = 0.0
    fail_status: int = 500
    auto_tools: bool = True  # False: refuse tool_choice "auto" as vLLM without a parser does
    # The prefix cache (bench.prefix_cache): 0 tokens, none. Each prompt token it does not
    # hold adds prefill_us_per_token to the time to first token.
    prefix_cache_tokens: int = 0
    prefill_us_per_token: float = 0.0
    # An embedding engine (vLLM's pooling runner): vectors of this many dimensions from
    # /v1/embeddings, and no chat or completions route (a bare 404, as vLLM). 0: generative.
    embed_dim: int = 0
    matryoshka: bool = False  # takes ``dimensions`` (shorter vectors, renormalised)
    embed_ms: float = 2.0  # one embeddings request's fixed time (the server, the scheduler)
    embed_us_per_input: float = 200.0  # and each input's (the forward pass)
    # Under load (bench.sim_load): the time between tokens by running requests, points
    # "running:ms" ("1:10,8:14,32:30"; empty: itl_ms whatever runs), and the KV cache budget
    # in tokens beyond which the latest request is preempted (0: none).
    itl_curve: str = ""
    kv_tokens: int = 0
    prefill_parallel: int = 1  # prefills at once under load (1: one at a time, as on CPU)


def _error(status: int, message: str) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": "BadRequestError" if status == 400 else "InternalServerError",
            "param": None,
            "code": status,
        }
    }
    return JSONResponse(body, status_code=status)


def _prompt_text(prompt: Any) -> str:
    """A completions prompt (a string, strings, token ids) as one text."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(_prompt_text(p) if isinstance(p, list | str) else str(p) for p in prompt)


def sim_vector(value: Any, dim: int) -> list[float]:
    """The simulator's embedding of one input: pseudo-random, seeded by the input, unit
    length, float32 values (what a test decodes from base64 equals the floats)."""
    seed = hashlib.sha256(json.dumps(value).encode()).digest()
    rng = random.Random(seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(v / norm for v in vector))))


def _prompt_tokens(messages: list[dict[str, Any]], continued: bool = False) -> int:
    """A prompt's tokens: 4 per message and one per word; a continued final message (the
    answer so far) counts its words only (its header is the generation prompt's, free)."""
    total = 0
    for i, m in enumerate(messages):
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content)
        last = continued and i == len(messages) - 1
        total += (0 if last else 4) + len(text.split())
    return total


def _continued(body: dict[str, Any]) -> str | None:
    """The answer so far a request continues (vLLM's ``continue_final_message``), or None."""
    messages = body.get("messages") or []
    if not body.get("continue_final_message") or not messages:
        return None
    last = messages[-1]
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        return None
    return str(last["content"])


AUTO_TOOLS_REFUSED = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)


# The header the worker's capability probe carries (llmq.worker.engine): counted apart, so
# that tests count the requests of jobs.
PROBE_HEADER = "x-llmq-probe"


def _as_text(choice: dict[str, Any]) -> dict[str, Any]:
    """A chat chunk's choice as a legacy completion's: its delta's content as ``text``."""
    delta = choice.get("delta") or {}
    out = {"index": choice["index"], "text": delta.get("content") or "", "logprobs": None,
           "finish_reason": choice.get("finish_reason")}  # fmt: skip
    if "stop_reason" in choice:
        out["stop_reason"] = choice["stop_reason"]
    return out


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.names = [m for m in config.model.split(",") if m]
        self.adapters = [a for a in config.adapters.split(",") if a]
        self.served = set(self.names) | set(self.adapters)
        self.stats = SimStats()
        self.holds = Holds()
        # The "tag" knob of each request, in the order they reached the engine (bounded).
        self.tags: collections.deque[str] = collections.deque(maxlen=10_000)
        self.recorded: dict[str, Any] = {}  # "record" knob -> the request's messages, tools
        self.sick = False  # failing as a dead engine core (POST /sim/sick, /sim/well)
        self.cache = PrefixCache(config.prefix_cache_tokens)
        self.load = LoadModel(
            config.itl_curve, config.kv_tokens, config.prefill_us_per_token, config.prefill_parallel
        )

    def _serves(self, model: str, *, probe: bool) -> bool:
        """Whether this engine serves ``model``; counted per model (probes apart)."""
        if not probe:
            self.stats.by_model[model] = self.stats.by_model.get(model, 0) + 1
            self.stats.not_found += model not in self.served
        return model in self.served

    def knobs(self, body: dict[str, Any]) -> dict[str, Any]:
        over = body.get("sim") or {}
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        so_far = _continued(body)
        start = len(so_far.split()) if so_far is not None else 0  # tokens already made
        tokens = int(over.get("tokens", start + int(limit) if limit else self.config.tokens))
        if limit:
            tokens = min(tokens, start + int(limit))
        return {
            "start": start,
            "ttft": float(over.get("ttft_ms", self.config.ttft_ms)) / 1000,
            "itl": float(over.get("itl_ms", self.config.itl_ms)) / 1000,
            # the request's own pace, kept under load (None: the load model's curve)
            "itl_fixed": float(over["itl_ms"]) / 1000 if "itl_ms" in over else None,
            "tokens": tokens,
            "finish": "length" if limit and tokens - start >= int(limit) else "stop",
            "fail_status": over.get("fail_status"),
            "hang": bool(over.get("hang", False)),
            "drop_after": over.get("drop_after"),
            "hold": over.get("hold"),
            "hold_after": int(over.get("hold_after", 1)),
            "pad": int(over.get("pad", 0)),
            "tag": over.get("tag"),
            # An agent's loop: the call until a tool's output comes back, then text.
            "tool_call": None
            if any(m.get("role") == "tool" for m in body.get("messages") or [])
            else over.get("tool_call"),
            "say": str(over.get("say", "tok")),
            "fail_message": over.get("fail_message"),
            "model": str(body.get("model")),
            "interval": max(1, int(body.get("stream_interval") or 1)),  # as vLLM's
        }

    async def chat(self, request: Request) -> Response:
        if self.config.embed_dim:  # a pooling model has no chat route
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        """Legacy completions: the prompt (a string or token ids) answered as chat is, in
        ``text_completion`` chunks."""
        if self.config.embed_dim:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return await self._generate(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        """A vector per input, the same for the same input (a hash seeds it), of
        ``embed_dim`` (or the request's ``dimensions`` on a Matryoshka engine) floats,
        normalised; float or base64 (little-endian float32) as asked. Takes
        ``embed_ms`` + ``embed_us_per_input`` per input. A generative engine has no such
        route (404)."""
        c = self.config
        if not c.embed_dim:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        probe = bool(request.headers.get(PROBE_HEADER))
        try:
            body = json.loads(await request.body())
            raw = body["input"]
        except (ValueError, KeyError):
            return _error(400, "invalid body")
        if not self._serves(str(body.get("model")), probe=probe):
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        tokens = [len(x) if isinstance(x, list) else len(str(x).split()) + 2 for x in inputs]
        refused = self._embed_refusal(body, tokens)
        if refused is not None:
            return refused
        dim = body.get("dimensions")
        if not probe:
            self.stats.requests += 1
            self.stats.embed_requests += 1
            self.stats.embed_inputs += len(inputs)
            self.stats.embed_largest = max(self.stats.embed_largest, len(inputs))
            if (body.get("sim") or {}).get("fail_status"):
                return _error(int(body["sim"]["fail_status"]), "injected failure")
        self.stats.running += 1
        try:
            await asyncio.sleep((c.embed_ms + c.embed_us_per_input * len(inputs) / 1000) / 1000)
        finally:
            self.stats.running -= 1
        base64_out = body.get("encoding_format") == "base64"
        data = []
        for i, x in enumerate(inputs):
            vector = sim_vector(x, int(dim or c.embed_dim))
            out: Any = vector
            if base64_out:
                out = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"index": i, "object": "embedding", "embedding": out})
        used = sum(tokens)
        return JSONResponse(
            {"id": f"embd-sim{self.stats.requests}", "object": "list", "created": int(time.time()),
             "model": body.get("model"), "data": data,
             "usage": {"prompt_tokens": used, "total_tokens": used}}
        )  # fmt: skip

    def _embed_refusal(self, body: dict[str, Any], tokens: list[int]) -> Response | None:
        """vLLM's refusals: ``dimensions`` on a model without Matryoshka vectors, or out of
        range; an input longer than the model's context."""
        c, dim, model = self.config, body.get("dimensions"), body.get("model")
        if dim is not None and not c.matryoshka:
            return _error(400, f"Model '{model}' does not support Matryoshka embeddings")
        if dim is not None and not 1 <= int(dim) <= c.embed_dim:
            return _error(400, f"dimensions must be 1..{c.embed_dim}")
        if max(tokens, default=0) > c.max_model_len:
            return _error(400, f"This model's maximum context length is {c.max_model_len} tokens.")
        return None

    async def _generate(self, request: Request, api: str) -> Response:
        if request.headers.get(PROBE_HEADER):
            self.stats.probes += 1
        else:
            self.stats.requests += 1
        try:
            body = json.loads(await request.body())
            if api == "completions":
                body["messages"] = [{"role": "user", "content": _prompt_text(body["prompt"])}]
            messages = body["messages"]
        except (ValueError, KeyError):
            return _error(400, "invalid body")
        if not self._serves(str(body.get("model")), probe=bool(request.headers.get(PROBE_HEADER))):
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        refused = self._refusal(body)
        if refused is not None:
            return refused
        k = self.knobs(body)
        k["api"] = api
        k["traceparent"] = request.headers.get("traceparent")  # a traced caller's context
        self._note(k, body)
        prompt = _prompt_tokens(messages, continued=k["start"] > 0)
        if prompt + k["tokens"] > self.config.max_model_len:
            return _error(
                400, f"This model's maximum context length is {self.config.max_model_len} tokens."
            )
        if k["fail_status"] or random.random() < self.config.fail_rate:
            self.stats.failures_injected += 1
            message = str(k["fail_message"] or "injected failure")
            return _error(int(k["fail_status"] or self.config.fail_status), message)
        if k["hang"]:
            await asyncio.sleep(3600)
        chain = self._prefill(k, messages, body.get("tools"))
        kind = "cmpl" if api == "completions" else "chatcmpl"
        rid = f"{kind}-sim{self.stats.requests}@{k['model']}"  # the model after "@"
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(rid, k, prompt, usage, chain), media_type="text/event-stream"
            )
        return await self._complete(rid, k, prompt, chain)

    def _refusal(self, body: dict[str, Any]) -> Response | None:
        """A dead engine's 500, or vLLM's refusal of tool_choice "auto" without a parser."""
        if self.sick:
            return _error(500, "EngineCore encountered an issue (the engine is dead)")
        auto = body.get("tools") and body.get("tool_choice", "auto") == "auto"
        if auto and not self.config.auto_tools:  # vLLM's own words
            return _error(400, AUTO_TOOLS_REFUSED)
        return None

    def _note(self, k: dict[str, Any], body: dict[str, Any]) -> None:
        """The "tag" and "record" knobs: what a test reads back from /sim/stats."""
        if k["tag"] is not None:
            self.tags.append(str(k["tag"]))
        if record := (body.get("sim") or {}).get("record"):
            flags = (
                "continue_final_message",
                "add_generation_prompt",
                "max_tokens",
                "max_completion_tokens",
            )
            self.recorded[str(record)] = {"messages": body["messages"], "tools": body.get("tools"),
                                          "traceparent": k.get("traceparent"),
                                          **{f: body.get(f) for f in flags}}  # fmt: skip

    def _prefill(
        self, k: dict[str, Any], messages: list[dict[str, Any]], tools: Any
    ) -> list[tuple[bytes, int]]:
        """With a prefix cache: the prompt's blocks are looked up (and cached), counted, and
        the time to first token grows by the part not cached. Returns the blocks."""
        c = self.config
        if c.prefix_cache_tokens <= 0 and c.prefill_us_per_token <= 0:
            return []
        chain = prompt_blocks(k["model"], messages, tools)
        hit, total = self.cache.lookup(chain)
        self.stats.prefix_queries += total
        self.stats.prefix_hits += hit
        k["ttft"] += (total - hit) * c.prefill_us_per_token / 1e6
        return chain

    def _cache_answer(self, chain: list[tuple[bytes, int]], k: dict[str, Any]) -> None:
        """The answer's blocks join the cache after the prompt's (the next turn holds it)."""
        if not chain:
            return
        self.cache.insert(with_answer(chain, self.text(k)))

    @staticmethod
    def text(k: dict[str, Any]) -> str:
        """The answer (what the chunks' contents add up to; a continuation's, from its
        next token)."""
        return "".join(f"{k['say']}{i} " + "x" * k["pad"] for i in range(k["start"], k["tokens"]))

    async def _complete(
        self, rid: str, k: dict[str, Any], prompt: int, chain: list[tuple[bytes, int]]
    ) -> Response:
        self.stats.running += 1
        seq = k["seq"] = self.load.join(prompt) if self.load.active else None
        try:
            made = k["tokens"] - k["start"]
            if seq is None:
                await asyncio.sleep(k["ttft"] + k["itl"] * max(0, made - 1))
            else:
                await seq.admitted.wait()
                await self.load.prefill_for(k["ttft"])
                for _ in range(made - 1):
                    await self._gap(k)
            if k["hold"]:
                await self.holds.wait(str(k["hold"]))
        except DroppedStream:
            return _error(500, "held job failed by the test")
        finally:
            self.stats.running -= 1
            if seq is not None:
                self.load.leave(seq)
        text = self.text(k)
        self._cache_answer(chain, k)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if k["tool_call"]:
            call = k["tool_call"]
            function = {"name": str(call["name"]), "arguments": str(call.get("arguments", "{}"))}
            message = {"role": "assistant", "content": None,
                       "tool_calls": [{"id": f"call_{rid}", "type": "function",
                                       "function": function}]}  # fmt: skip
        made = k["tokens"] - k["start"]
        if rid.startswith("cmpl-"):
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": k["finish"]}
            counts = {"prompt_tokens": prompt, "completion_tokens": made,
                      "total_tokens": prompt + made}  # fmt: skip
            return JSONResponse(
                {"id": rid, "object": "text_completion", "created": int(time.time()),
                 "model": k["model"], "choices": [choice], "usage": counts}
            )  # fmt: skip
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": k["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if k["tool_call"] else k["finish"],
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": made,
                    "total_tokens": prompt + made,
                },
            }
        )

    def _chunk(self, rid: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        text = rid.startswith("cmpl-")  # a legacy completion: text, not a delta
        if text:
            choices = [_as_text(c) for c in choices]
        obj = {
            "id": rid,
            "object": "text_completion" if text else "chat.completion.chunk",
            "created": int(time.time()),
            "model": rid.partition("@")[2],
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    async def _stream(
        self,
        rid: str,
        k: dict[str, Any],
        prompt: int,
        usage: bool,
        chain: list[tuple[bytes, int]],
    ) -> AsyncIterator[bytes]:
        self.stats.streams_started += 1
        self.stats.running += 1
        seq = k["seq"] = self.load.join(prompt) if self.load.active else None
        try:
            if seq is None:
                await asyncio.sleep(k["ttft"])
            else:
                await seq.admitted.wait()
                await self.load.prefill_for(k["ttft"])  # prefill_parallel at a time
            frames = (
                self._tool_call(rid, k, prompt, usage)
                if k["tool_call"]
                else self._tokens(rid, k, prompt, usage)
            )
            async for frame in frames:
                yield frame
            self.stats.streams_completed += 1
            self._cache_answer(chain, k)
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.streams_abandoned += 1
            raise
        finally:
            self.stats.running -= 1
            if seq is not None:
                self.load.leave(seq)

    async def _gap(self, k: dict[str, Any]) -> None:
        """The wait before a request's next token: its own fixed pace, or the load model's
        (the batch's pace, stalled while preempted)."""
        seq = k.get("seq")
        if seq is None:
            await asyncio.sleep(k["itl"])
        else:
            await self.load.gap(seq, k["itl_fixed"], k["itl"])

    async def _tokens(
        self, rid: str, k: dict[str, Any], prompt: int, usage: bool
    ) -> AsyncIterator[bytes]:
        """The text answer, token by token (one delta per ``stream_interval`` after the
        first), held or dropped where the knobs say; the finish chunk, the usage."""
        start = k["start"]
        text, sent = "", start
        if start:  # a continuation: vLLM's first chunk is the role, with no content
            delta0 = {"role": "assistant", "content": ""}
            yield self._chunk(
                rid, [{"index": 0, "delta": delta0, "logprobs": None, "finish_reason": None}]
            )
        for i in range(start, k["tokens"]):
            if k["drop_after"] is not None and i >= int(k["drop_after"]):
                raise DroppedStream(rid)
            if k["hold"] and i == k["hold_after"]:
                await self.holds.wait(str(k["hold"]))
            if i > start:
                await self._gap(k)
            text += f"{k['say']}{i} " + "x" * k["pad"]
            if i > start and i + 1 - sent < k["interval"] and i + 1 < k["tokens"]:
                continue
            delta: dict[str, Any] = {"content": text}
            if i == 0:
                delta = {"role": "assistant", **delta}
            text, sent = "", i + 1
            yield self._chunk(
                rid, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
            )
        if k["hold"] and k["hold_after"] >= k["tokens"]:
            await self.holds.wait(str(k["hold"]))
        finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": k["finish"],
                  "stop_reason": None}  # fmt: skip
        yield self._chunk(rid, [finish])
        if usage:
            made = k["tokens"] - start
            counts = {"prompt_tokens": prompt, "completion_tokens": made,
                      "total_tokens": prompt + made}  # fmt: skip
            yield self._chunk(rid, [], usage=counts)
        yield b"data: [DONE]\n\n"

    async def _tool_call(
        self, rid: str, k: dict[str, Any], prompt: int, usage: bool
    ) -> AsyncIterator[bytes]:
        """A function call, streamed as vLLM streams one: its id and name, then the
        arguments in two pieces, then the finish chunk (``tool_calls``) and the usage."""
        call = k["tool_call"]
        arguments = str(call.get("arguments", "{}"))
        half = len(arguments) // 2
        first = {"index": 0, "id": f"call_{rid}", "type": "function",
                 "function": {"name": str(call["name"]), "arguments": ""}}  # fmt: skip
        deltas = [
            {"role": "assistant", "content": None, "tool_calls": [first]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]},
        ]
        for delta in deltas:
            yield self._chunk(
                rid, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
            )
            await asyncio.sleep(k["itl"])
        finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
        yield self._chunk(rid, [finish])
        if usage:
            counts = {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
            yield self._chunk(rid, [], usage=counts)
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        """As vLLM lists them: each served name, then each adapter with its ``parent``."""
        base = self.names[0]
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "sim", "root": base,
             "parent": None, "max_model_len": self.config.max_model_len}
            for m in self.names
        ] + [
            {"id": a, "object": "model", "created": 0, "owned_by": "sim", "root": f"/lora/{a}",
             "parent": base, "max_model_len": self.config.max_model_len}
            for a in self.adapters
        ]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def get_stats(self, request: Request) -> Response:
        stats = {**asdict(self.stats), "held": dict(self.holds.held), "tags": list(self.tags),
                 "recorded": self.recorded}  # fmt: skip
        return JSONResponse(stats)

    async def reset(self, request: Request) -> Response:
        self.stats = SimStats(running=self.stats.running)
        for name in list(self.holds.held):
            self.holds.fail(name)  # a test that ended without releasing must not leak streams
        self.holds = Holds()
        self.tags.clear()
        self.recorded.clear()
        return JSONResponse({"ok": True})

    async def release(self, request: Request) -> Response:
        self.holds.release(request.path_params["name"])
        return JSONResponse({"ok": True})

    async def fail(self, request: Request) -> Response:
        self.holds.fail(request.path_params["name"])
        return JSONResponse({"ok": True})

    async def metrics(self, request: Request) -> Response:
        label = f'{{model_name="{self.names[0]}"}}'
        st = self.stats
        return PlainTextResponse(
            f"vllm:num_requests_running{label} {st.running}\n"
            f"vllm:num_requests_waiting{label} {self.load.waiting}\n"
            f"vllm:num_preemptions_total{label} {self.load.preemptions}\n"
            f"vllm:prefix_cache_queries_total{label} {st.prefix_queries}\n"
            f"vllm:prefix_cache_hits_total{label} {st.prefix_hits}\n"
        )

    async def health(self, request: Request) -> Response:
        return Response(status_code=500 if self.sick else 200)

    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``/tokenize``: a prompt's token count as the usage counts it."""
        body = json.loads(await request.body())
        if "prompt" in body:
            count = _prompt_tokens([{"role": "user", "content": _prompt_text(body["prompt"])}])
        else:
            messages = body.get("messages") or []
            count = _prompt_tokens(messages, continued=_continued(body) is not None)
        return JSONResponse(
            {"count": count, "max_model_len": self.config.max_model_len,
             "tokens": list(range(count))}
        )  # fmt: skip

    async def set_sick(self, request: Request) -> Response:
        self.sick = request.url.path.endswith("/sick")
        return JSONResponse({"ok": True, "sick": self.sick})


def create_app(config: SimConfig) -> Starlette:
    sim = Simulator(config)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", sim.chat, methods=["POST"]),
            Route("/v1/completions", sim.completions, methods=["POST"]),
            Route("/v1/embeddings", sim.embeddings, methods=["POST"]),
            Route("/v1/models", sim.models),
            Route("/health", sim.health),
            Route("/metrics", sim.metrics),
            Route("/sim/stats", sim.get_stats),
            Route("/sim/reset", sim.reset, methods=["POST"]),
            Route("/sim/release/{name}", sim.release, methods=["POST"]),
            Route("/sim/fail/{name}", sim.fail, methods=["POST"]),
            Route("/tokenize", sim.tokenize, methods=["POST"]),
            Route("/sim/sick", sim.set_sick, methods=["POST"]),
            Route("/sim/well", sim.set_sick, methods=["POST"]),
        ]
    )
    app.state.sim = sim
    return app


def main(argv: list[str] | None = None) -> None:
    """One flag per SimConfig field (``--ttft-ms``, ``--prefix-cache-tokens``, ...), with its
    default; ``--no-auto-tools`` refuses tool_choice "auto" as vLLM without a parser does."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    defaults = SimConfig()
    for f in fields(SimConfig):
        value = getattr(defaults, f.name)
        if isinstance(value, bool) and value:
            ap.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false")
        elif isinstance(value, bool):
            ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true")
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)
    a = ap.parse_args(argv)
    config = SimConfig(**{f.name: getattr(a, f.name) for f in fields(SimConfig)})
    uvicorn.run(create_app(config), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
