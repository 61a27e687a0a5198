"""A request's prefix signature: what cache-aware pickup compares (``queue.routing``'s PICK).

An engine's prefix (KV) cache keeps the prompt blocks it computed; a later request that
starts with the same text skips their prefill. The signature is a chain of hashes over the
prompt in blocks: the tools (they are part of the prompt the chat template builds), then each
message (role, content and the rest, as canonical JSON) cut into ``BLOCK_CHARS`` pieces. Each
hash covers everything before it, so two requests share their leading hashes exactly as far
as their prompts agree: the turns of one conversation share all the hashes of the earlier
turn, and conversations with one system prompt share its hashes. The chain is seeded with
the model (an engine caches per model), and only its first ``MAX_BLOCKS`` hashes are kept:
what tells conversations apart comes early, and a bound keeps the pick script cheap.

The hashes are 64-bit BLAKE2b digests: what Redis holds (``llmq:prefix:<id>``, the workers'
records) is never the prompt's text. With PAYLOAD_KEYS the chain's seed is keyed (the
sealer's ``prefix_key``): without the key nobody can confirm a guessed prompt against them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import Any

BLOCK_CHARS = 1024  # about 256 tokens: a long message counts as several blocks
MAX_BLOCKS = 32
_PERSON = b"llmq-prefix"


def _digest(data: bytes, key: bytes = b"") -> bytes:
    return blake2b(data, digest_size=8, person=_PERSON, key=key).digest()


def _texts(messages: Sequence[Mapping[str, Any]], tools: Any) -> Iterator[str]:
    if tools:
        yield json.dumps(tools, sort_keys=True, separators=(",", ":"))
    for m in messages:
        yield json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _chain(h: bytes, texts: Iterator[str]) -> Iterator[tuple[bytes, int]]:
    for text in texts:
        for i in range(0, max(1, len(text)), BLOCK_CHARS):
            piece = text[i : i + BLOCK_CHARS]
            h = _digest(h + piece.encode())
            yield h, len(piece)


def blocks(
    model: str, messages: Sequence[Mapping[str, Any]], tools: Any = None, key: bytes = b""
) -> Iterator[tuple[bytes, int]]:
    """(chained hash, characters) of each block of the prompt, in order, unbounded (the
    engine simulator's cache reads them all). ``key`` seeds the chain (every hash after
    depends on it)."""
    return _chain(_digest(model.encode(), key), _texts(messages, tools))


def extend(chain: bytes, message: Mapping[str, Any]) -> Iterator[tuple[bytes, int]]:
    """The blocks of ``message`` appended after a prompt whose last hash is ``chain`` (what
    an engine caches of the answer it generated: the next turn's prompt holds it)."""
    return _chain(chain, _texts([message], None))


def signature(body: Mapping[str, Any], model: str, key: bytes = b"") -> tuple[str, ...]:
    """The job's signature: the first MAX_BLOCKS chained hashes of its request ``body``
    (hex), keyed with ``key`` (``Sealer.prefix_key``). Empty when the body has no
    messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return ()
    out: list[str] = []
    for h, _ in blocks(model, messages, body.get("tools"), key):
        out.append(h.hex())
        if len(out) == MAX_BLOCKS:
            break
    return tuple(out)
