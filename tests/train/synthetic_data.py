"""A deterministic, resumable, learnable token stream for trainer tests: arithmetic progressions mod vocab."""

from __future__ import annotations

import torch


class ProgressionData:
    """Batch k is a pure function of (seed, k): rows count up from a random start by a random stride
    in {1, 2, 3}, so a small model learns to continue them and the loss falls."""

    def __init__(self, vocab: int = 64, batch: int = 4, length: int = 16, seed: int = 0, spikes: set[int] = ()):
        self.vocab, self.batch, self.length, self.seed = vocab, batch, length, seed
        self.spikes = set(spikes)  # batch indices replaced by noise with permuted labels (a loss spike)
        self.pos = 0

    def make(self, k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        start = torch.randint(0, self.vocab, (self.batch, 1), generator=g)
        stride = torch.randint(1, 4, (self.batch, 1), generator=g)
        ids = (start + stride * torch.arange(self.length)) % self.vocab
        labels = ids.clone()
        if k in self.spikes:
            labels = torch.randint(0, self.vocab, ids.shape, generator=g)
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    def __iter__(self):
        while True:
            k = self.pos
            self.pos += 1
            yield self.make(k)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class FixedValData:
    def __init__(self, n: int = 4, **kw):
        self.source = ProgressionData(seed=999, **kw)
        self.n = n

    def __iter__(self):
        return (self.source.make(k) for k in range(self.n))
