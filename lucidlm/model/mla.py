"""Multi-head latent attention (DeepSeek-V2, 2024; also DeepSeek-V3).

Keys and values are not projected per head from the input; both come from one small latent
``c_kv = norm(W_DKV x)`` of ``kv_lora_rank`` channels, expanded per head by ``W_UK`` and ``W_UV``.
Position goes through a separate, decoupled RoPE key ``k_pe`` shared by all heads (RoPE cannot be
applied to the latent, since the rotation would not commute with the up-projection).
Each head's query is [q_nope, q_pe]; its score is q_nope·(W_UK c) + q_pe·k_pe.

Two equivalent computations:
- naive: expand c_kv to full per-head K and V, then ordinary attention;
- absorbed (what a KV cache wants): fold W_UK into the query, (W_UKᵀ q_nope)·c, and W_UV into the
  output, so attention runs directly over the cached latent — an MQA with one shared "head" of
  width kv_lora_rank + rope_dim. The cache holds only c_kv and k_pe per token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .attention import attend
from .kv_cache import KVCache
from .linear import Linear
from .norm import RMSNorm
from .rope import apply_rope, yarn_mscale


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times DeepSeek's YaRN mscale² when the context is extended."""
    mla = cfg.mla
    scale = cfg.attn_scale or 1.0 / math.sqrt(mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    s = cfg.rope_scaling
    if s.type != "default" and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # which KV-cache layer this attention writes
        mla = cfg.mla
        assert mla is not None
        self.n_heads = cfg.n_heads
        self.rank, self.nope, self.rope_dim, self.v_dim = (
            mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        )
        self.scale = mla_softmax_scale(cfg)
        self.absorbed = False  # switch to the latent-space computation (same result)
        self.rope_interleaved = cfg.rope_interleaved
        qk_dim = self.nope + self.rope_dim
        bias = cfg.attn_qkv_bias
        if mla.q_lora_rank is None:
            self.q_proj = Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
        else:  # queries are low-rank too (V3, V2 full): down, norm, up
            self.q_a_proj = Linear(cfg.dim, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = Linear(mla.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.dim, self.rank + self.rope_dim, bias=bias)  # W_DKV and W_KR
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.norm_eps)
        self.kv_b_proj = Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)  # W_UK, W_UV
        self.o_proj = Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=cfg.attn_out_bias)

    def project_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)
        return q.split([self.nope, self.rope_dim], dim=-1)  # (b, h, s, nope), (b, h, s, rope)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a KV cache stores: c_kv (b, s, rank) and the un-rotated k_pe (b, 1, s, rope)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_pe[:, None]

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (h, nope, rank) and W_UV (h, v, rank) as views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def forward(
        self,
        x: torch.Tensor,  # (batch, seq, dim)
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q_nope, q_pe = self.project_q(x)
        c_kv, k_pe = self.latent(x)
        q_pe = apply_rope(q_pe, *rope, interleaved=self.rope_interleaved)
        k_pe = apply_rope(k_pe, *rope, interleaved=self.rope_interleaved)
        absorbed = self.absorbed
        if cache is not None:  # the cache holds only the latent and the rotated RoPE key
            c_kv, k_pe = cache.update(self.layer, c_kv[:, None], k_pe)
            c_kv = c_kv[:, 0]
            absorbed = absorbed or s == 1  # decode: attend in latent space, never expand the cache
        if absorbed:
            out = self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask, bias)
        else:
            out = self._attend_naive(q_nope, q_pe, c_kv, k_pe, mask, bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.v_dim))

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask, bias) -> torch.Tensor:
        b, t, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, t, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (b, h, t, nope), (b, h, t, v)
        k = torch.cat([k_nope, k_pe.expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attend(q, k, v, mask, self.scale, bias)  # (b, h, s, v)

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, bias) -> torch.Tensor:
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk)  # W_UKᵀ q_nope: (b, h, s, rank)
        q = torch.cat([q_latent, q_pe], dim=-1)  # (b, h, s, rank + rope)
        k = torch.cat([c_kv[:, None], k_pe], dim=-1)  # one shared head: (b, 1, t, rank + rope)
        o_latent = attend(q, k, c_kv[:, None], mask, self.scale, bias)  # (b, h, s, rank)
        return torch.einsum("bhsr,hvr->bhsv", o_latent, w_uv)  # W_UV o: (b, h, s, v)
