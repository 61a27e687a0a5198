"""The engine simulator's prefix (KV) cache: an LRU of prompt blocks, as vLLM keeps one.

Blocks are ``llmq.shared.prefix``'s chained hashes (a block's hash covers everything before
it), so a prompt's cached part is its longest run of leading blocks still in the cache. A
block weighs its characters / 4 tokens; the cache holds up to ``capacity`` tokens and
evicts the least recently used block first. The simulator counts them as vLLM does (tokens
queried and hit: ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llmq.shared import prefix


def tokens_of(chars: int) -> int:
    return max(1, -(-chars // 4))


class PrefixCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = capacity_tokens
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.size = 0

    def lookup(self, blocks: Iterable[tuple[bytes, int]]) -> tuple[int, int]:
        """(cached tokens, prompt tokens) of a prompt's ``blocks`` (hash, tokens), which
        are cached from now on (what its prefill computes)."""
        hit, total, leading = 0, 0, True
        prompt: list[tuple[bytes, int]] = []
        for h, n in blocks:
            total += n
            leading = leading and h in self._blocks
            hit += n if leading else 0
            prompt.append((h, n))
        self.insert(prompt)
        return hit, total

    def insert(self, blocks: list[tuple[bytes, int]]) -> None:
        """Cache ``blocks`` (hash, tokens) of one chain as just used. The chain's first
        block ends up the most recent, so eviction takes a chain's tail first (a block is
        of no use once one before it is gone)."""
        if self.capacity <= 0:
            return
        for h, tokens in reversed(blocks):
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                self._blocks[h] = tokens
                self.size += tokens
        while self.size > self.capacity and self._blocks:
            _, dropped = self._blocks.popitem(last=False)
            self.size -= dropped


def prompt_blocks(
    model: str, messages: Sequence[Mapping[str, Any]], tools: Any
) -> list[tuple[bytes, int]]:
    """(hash, tokens) of each block of a prompt."""
    return [(h, tokens_of(chars)) for h, chars in prefix.blocks(model, messages, tools)]


def with_answer(chain: list[tuple[bytes, int]], text: str) -> list[tuple[bytes, int]]:
    """``chain`` followed by the blocks of the assistant's answer ``text`` (the next turn
    of the conversation holds them)."""
    answer = {"role": "assistant", "content": text}
    return chain + [(h, tokens_of(chars)) for h, chars in prefix.extend(chain[-1][0], answer)]
