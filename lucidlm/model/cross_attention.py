"""Cross-attention (encoder–decoder attention, Vaswani et al. 2017 §3.2.3).

Queries come from the decoder stream; keys and values come from the encoder output (``memory``),
so every target position can read the whole source sentence. The memory does not change while the
decoder runs, so its keys and values are projected once per source (``project_memory``) and reused
at every decoding step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import attend
from .linear import Linear


class CrossAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = Linear(dim, dim, bias=bias)
        self.k_proj = Linear(dim, dim, bias=bias)
        self.v_proj = Linear(dim, dim, bias=bias)
        self.o_proj = Linear(dim, dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, len, dim) -> (batch, heads, len, head_dim)."""
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (batch, src_len, dim) -> keys, values, each (batch, heads, src_len, head_dim)."""
        return self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))

    def forward(
        self,
        x: torch.Tensor,  # (batch, tgt_len, dim): the decoder stream
        memory_kv: tuple[torch.Tensor, torch.Tensor],  # from project_memory
        mask: torch.Tensor | None,  # bool (batch, 1, 1 or tgt_len, src_len), True = a real source token
    ) -> torch.Tensor:
        b, t, dim = x.shape
        out = attend(self._heads(self.q_proj(x)), *memory_kv, mask, 1.0 / math.sqrt(self.head_dim))  # (b, h, t, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, dim))
