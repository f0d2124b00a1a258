"""Prefix caching: a prompt head already prefilled (a chat template's system prompt, a few-shot preamble) is
copied into a new sequence's slot instead of being computed again; only the rest of the prompt is prefilled.

Keys are whole blocks of ``block`` tokens, as vLLM's automatic prefix caching hashes KV blocks: a new prompt
reuses the longest block-aligned head it shares with a stored prompt, always leaving at least one token to run
(its logits start the generation). Entries are copies of the K/V cells, least recently used evicted past
``max_bytes``. Attention of the remaining tokens over copied cells is the same computation as over cells
prefilled in place, so the logits equal a full prefill's (up to float rounding of a different chunking).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # block-aligned prompt head
    cells: list[tuple[torch.Tensor, ...]]  # per layer, K/V of those tokens
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 64) -> None:
        if block < 1 or max_bytes < 0:
            raise ValueError(f"block must be >= 1 and max_bytes >= 0, got {block}, {max_bytes}")
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self.by_head: dict[tuple[int, ...], tuple[int, ...]] = {}  # each block-aligned head -> its entry's key
        self.nbytes = 0
        self.hits = 0  # prompts that reused a head, and tokens not prefilled thanks to it
        self.tokens_saved = 0

    def storable(self, prompt: Sequence[int]) -> int:
        """How many tokens of ``prompt`` an entry would hold (0: too short to be worth a block)."""
        return (len(prompt) - 1) // self.block * self.block

    def match(self, prompt: Sequence[int]) -> tuple[list[tuple[torch.Tensor, ...]], int] | None:
        """The stored cells and length of the longest block-aligned head of ``prompt`` (leaving >= 1 token)."""
        for n in range(self.storable(prompt), 0, -self.block):
            key = self.by_head.get(tuple(prompt[:n]))
            if key is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                self.tokens_saved += n
                return self.entries[key].cells, n
        return None

    def has(self, prompt: Sequence[int]) -> bool:
        n = self.storable(prompt)
        return n > 0 and tuple(prompt[:n]) in self.by_head

    def store(self, prompt: Sequence[int], cells: list[tuple[torch.Tensor, ...]]) -> None:
        """Keep ``cells`` (per layer, K/V of the first ``storable(prompt)`` tokens) for later prompts."""
        n = self.storable(prompt)
        key = tuple(prompt[:n])
        nbytes = sum(t.numel() * t.element_size() for pair in cells for t in pair)
        if n == 0 or key in self.entries or nbytes > self.max_bytes:
            return
        self.entries[key] = _Entry(key, cells, nbytes)
        self.nbytes += nbytes
        for k in range(self.block, n + 1, self.block):
            self.by_head.setdefault(key[:k], key)
        while self.nbytes > self.max_bytes:
            self._evict(next(iter(self.entries)))

    def _evict(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        for k in range(self.block, len(key) + 1, self.block):
            if self.by_head.get(key[:k]) == key:
                del self.by_head[key[:k]]
                other = next((e for e in self.entries if e[:k] == key[:k]), None)  # another entry with this head
                if other is not None:
                    self.by_head[key[:k]] = other
