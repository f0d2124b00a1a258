"""Per cache slot, the tokens a sequence already holds: what the repetition and OpenAI penalties read.

- ``seen`` (slots, vocab) bool: the prompt and every generated token (CTRL's repetition penalty, as transformers
  applies it: prompt included);
- ``counts`` (slots, vocab) int: how often each token was generated (OpenAI's presence/frequency penalties count
  output tokens only, as OpenAI and vLLM do).

Both are allocated on first need, so a batch without penalties pays nothing. The engine and beam search share it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import SamplingParams, seen_tokens


class TokenHistory:
    def __init__(self, n_slots: int, vocab: int, device: torch.device) -> None:
        self.n_slots, self.vocab, self.device = n_slots, vocab, device
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def start(self, slot: int, prompt: Sequence[int], params: SamplingParams) -> None:
        """A new sequence in ``slot``: its prompt is seen, nothing is generated yet."""
        if params.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.n_slots, self.vocab, dtype=torch.bool, device=self.device)
        if params.counts_tokens and self.counts is None:
            self.counts = torch.zeros(self.n_slots, self.vocab, dtype=torch.int32, device=self.device)
        if self.seen is not None:
            self.seen[slot] = seen_tokens(torch.tensor([list(prompt)], device=self.device), self.vocab)[0]
        if self.counts is not None:
            self.counts[slot] = 0

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(seen, counts) of ``slots`` (rows,), each None when no sequence needed it."""
        return (None if self.seen is None else self.seen[slots],
                None if self.counts is None else self.counts[slots])

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """One step's new token per slot (rows,)."""
        if self.seen is not None:
            self.seen[slots, tokens] = True
        if self.counts is not None:
            self.counts[slots, tokens] += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Slot i takes the history of slot index[i] (beam search keeps the surviving beams)."""
        for name in ("seen", "counts"):
            t = getattr(self, name)
            if t is not None:
                t.copy_(t.index_select(0, index))
