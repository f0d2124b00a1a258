"""Absolute position embeddings added to the token embeddings before block 0.

- sinusoidal (Vaswani et al. 2017): fixed, PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...).
- learned (GPT-2's ``wpe``): one trained vector per position up to ``max_seq_len``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed (n_positions, dim) table of the original Transformer (sin on even, cos on odd)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, max_seq_len: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_seq_len, dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]  # (batch, seq, dim)


class LearnedPositions(nn.Module):
    def __init__(self, max_seq_len: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, dim))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)  # (batch, seq, dim)
