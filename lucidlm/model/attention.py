"""Multi-head self-attention with grouped key/value heads.

One implementation covers the family by the number of key/value heads:
MHA (n_kv_heads = n_heads), GQA (Ainslie et al. 2023: groups of query heads share a K/V head) and
MQA (Shazeer 2019: n_kv_heads = 1). Fewer K/V heads shrink the KV cache by n_heads/n_kv_heads.

Options, each from a paper the notes discuss:
- ``qk_norm``: RMSNorm over each head's q and k before RoPE (Qwen3, OLMo-2, Gemma 3 with its (1 + w)
  weights), tames logit growth;
- ``attn_gate``: a sigmoid gate per output channel, computed from the layer input (gated
  attention, Qiu et al. 2025 / Qwen3-Next), lets a head output nothing and removes attention sinks;
- sliding window: handled by the mask the block receives (see ``masks.py``);
- dual chunk attention: RoPE positions per (query, key) pair, when the block receives a ``DualChunkRope``
  (see ``dual_chunk_attention.py``);
- S2-Attn (LongLoRA): in training without a cache, attention within shifted groups (``shifted_sparse_attention.py``).

The score computation is softmax(q·kᵀ·scale + bias + mask)·v via
``F.scaled_dot_product_attention``, which picks a fused kernel where one applies (on CPU, a decode
step in bfloat16/float16 takes ``cpu_kernels.attend_one_query`` instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cpu_kernels import attend_one_query, use_one_query
from .dual_chunk_attention import DualChunkRope, dual_chunk_attend
from .kv_cache import KVCache
from .linear import Linear
from .norm import RMSNorm
from .rope import apply_rope
from .shifted_sparse_attention import s2_attend


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias, masked) v.

    q: (batch, heads, q_len, d); k, v: (batch, kv_heads, k_len, d|dv) with heads % kv_heads == 0.
    mask: bool (batch, 1, q_len, k_len), True = attend. bias: additive (batch, heads, q_len, k_len).
    """
    if use_one_query(q):  # the dispatch point to the CPU decode-step form (cpu_kernels.py)
        return attend_one_query(q, k, v, mask, scale, bias)
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(q.dtype).min)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # which KV-cache layer this attention writes
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
        self.rope_interleaved = cfg.rope_interleaved
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.dim, q_dim, bias=cfg.attn_qkv_bias)
        self.k_proj = Linear(cfg.dim, kv_dim, bias=cfg.attn_qkv_bias)
        self.v_proj = Linear(cfg.dim, kv_dim, bias=cfg.attn_qkv_bias)
        self.o_proj = Linear(q_dim, cfg.dim, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.gate_proj = Linear(cfg.dim, q_dim, bias=False) if cfg.attn_gate else None
        # q, k and v as one quantized layer (model/fused_projections.py: one kernel call instead of three)
        self.qkv_proj: nn.Module | None = None
        self.qkv_split = (q_dim, kv_dim, kv_dim)
        self.s2_group = cfg.s2_attn_group  # S2-Attn's group size, used by training forwards only

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.qkv_split, -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,  # (batch, seq, dim)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        q, k, v = self.heads(x, rope)
        if cache is not None:  # store the new keys/values, attend over all cached ones
            k, v = cache.update(self.layer, k, v)
        if self.s2_group is not None and self.training and cache is None:  # LongLoRA: full attention at inference
            out = s2_attend(q, k, v, self.s2_group, mask, self.scale, bias)
        elif isinstance(rope, DualChunkRope):  # each score with its region's query rotation (dual_chunk_attention.py)
            out = dual_chunk_attend(q, k, v, mask, self.scale, rope, self.rope_interleaved)
        else:
            out = attend(q, k, v, mask, self.scale, bias)  # (b, h, s, hd)
        return self.merge_heads(out, x)

    def heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, s, dim) -> q (b, h, s, hd), k and v (b, kv, s, hd): projected, QK-normed, then rotated."""
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope, interleaved=self.rope_interleaved)
            k = apply_rope(k, *rope, interleaved=self.rope_interleaved)
        return q, k, v

    def merge_heads(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (b, h, s, hd) -> (b, s, dim): concatenated, gated by x (gated attention), projected."""
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        if self.gate_proj is not None:
            out = out * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(out)
