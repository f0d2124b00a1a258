"""Prefill: prompts run through the model into their cache slots, a chunk of positions per forward.

Prompts admitted together are left-padded to the longest and share each forward; the cache marks padding cells
invalid and position ids skip them, so every row computes what it would alone. Chunks bound the memory of
one forward (activations grow with the tokens in it) and let the engine interleave a long prompt with running
decode steps (chunked prefill, as in Sarathi and vLLM): it calls ``run_chunk`` once per iteration.

A slot may already hold a prompt head (prefix caching): its row then continues from that length, and only the
rest of its prompt is here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.kv_cache import KVCache
from ..model.transformer import ModelOutput, Transformer


class Prefill:
    def __init__(self, prompts: Sequence[Sequence[int]], slots: list[int], pad_token_id: int, chunk: int,
                 device: torch.device) -> None:
        longest = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            self.ids[i, longest - len(p):] = torch.tensor(list(p))
            self.mask[i, longest - len(p):] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.pads = [longest - len(p) for p in prompts]  # padding cells before each row's tokens
        self.slots, self.chunk, self.cursor = slots, chunk, 0

    @property
    def done(self) -> bool:
        return self.cursor >= self.ids.shape[1]

    @property
    def positions(self) -> int:
        """Positions of the padded prompts, all chunks together."""
        return self.ids.shape[1]

    def run_chunk(self, model: Transformer, cache: KVCache, hidden_layers: tuple[int, ...] = (),
                  width: int | None = None) -> ModelOutput:
        """The next chunk of positions (``chunk``, or fewer: ``width``); its output covers the chunk's last position
        (after the last chunk: the logits of every prompt's last token, and its hidden states at ``hidden_layers``)."""
        width = self.chunk if width is None else max(1, min(width, self.chunk))
        start, end = self.cursor, min(self.cursor + width, self.ids.shape[1])
        plan = cache.begin(self.slots, end - start, self.mask[:, start:end])
        out = model.forward_planned(self.ids[:, start:end], plan, cache, hidden_layers=hidden_layers, last_only=True)
        self.cursor = end
        return out


def prefill(model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]], slots: list[int],
            pad_token_id: int, chunk: int) -> torch.Tensor:
    """Run whole prompts into ``slots``; the logits of each one's last token (rows, vocab)."""
    job = Prefill(prompts, slots, pad_token_id, chunk, cache.device)
    while True:
        out = job.run_chunk(model, cache)
        if job.done:
            return out.logits[:, -1]
