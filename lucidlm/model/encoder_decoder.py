"""The original Transformer (Vaswani et al. 2017, "Attention Is All You Need"): encoder–decoder with
cross-attention, built from the same pieces as the decoder-only models (``attend``, ``Linear``,
LayerNorm, the sinusoidal table).

    src ─embed·√d + PE─▶ [self-attn (padding mask) → FFN] × N ──────────────▶ memory
    tgt ─embed·√d + PE─▶ [causal self-attn → cross-attn(memory) → FFN] × N ─▶ linear ─▶ logits

Each sublayer is wrapped as LayerNorm(x + Dropout(sublayer(x))) — post-norm, as in the paper
(``norm_first=True`` gives the pre-norm variant, with a final norm on each stack). The FFN is
ReLU(x W1 + b1) W2 + b2; source and target share one embedding, also used (transposed) as the
output projection (§3.4). Dropout 0.1 on every sublayer output and on the embeddings (§5.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .absolute_positions import SinusoidalPositions
from .attention import attend
from .linear import Linear


@dataclass
class EncoderDecoderConfig:
    vocab_size: int = 37000  # shared source/target BPE vocabulary (the paper's English–German setup)
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    max_len: int = 512
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    norm_first: bool = False  # False: post-norm, as in the paper
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


class MultiHeadAttention(nn.Module):
    """Queries from ``x``; keys and values from ``memory`` (= x for self-attention)."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # (b, len, d) -> (b, heads, len, head_dim)
            return y.view(b, -1, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(memory)), heads(self.v_proj(memory))
        out = attend(q, k, v, mask, 1.0 / math.sqrt(self.head_dim))  # (b, heads, t, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.up, self.down, self.dropout = Linear(d, ffn_dim), Linear(ffn_dim, d), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))


class Sublayer(nn.Module):
    """x + Dropout(f(x)) then LayerNorm (post-norm), or x + Dropout(f(LayerNorm(x))) (pre-norm)."""

    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.norm, self.dropout, self.norm_first = nn.LayerNorm(cfg.d_model, cfg.norm_eps), nn.Dropout(cfg.dropout), \
            cfg.norm_first

    def forward(self, x: torch.Tensor, f) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(f(self.norm(x)))
        return self.norm(x + self.dropout(f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.self_attn, self.ffn = MultiHeadAttention(cfg.d_model, cfg.n_heads), FeedForward(
            cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.attn_sub, self.ffn_sub = Sublayer(cfg), Sublayer(cfg)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_sub(x, lambda h: self.self_attn(h, h, src_mask))
        return self.ffn_sub(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.self_sub, self.cross_sub, self.ffn_sub = Sublayer(cfg), Sublayer(cfg), Sublayer(cfg)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor,
                src_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.self_sub(y, lambda h: self.self_attn(h, h, tgt_mask))  # causal: no peeking ahead
        y = self.cross_sub(y, lambda h: self.cross_attn(h, memory, src_mask))  # every target token reads the source
        return self.ffn_sub(y, self.ffn)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.positions = SinusoidalPositions(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # pre-norm stacks end with a norm (post-norm outputs are already normalised)
        self.encoder_norm = nn.LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.xavier_uniform_(p)  # as the reference implementations (tensor2tensor, annotated transformer)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.weight, 0.0, self.config.d_model**-0.5)  # logits = h · E with E tied
        with torch.no_grad():
            self.embed.weight[self.config.pad_id].zero_()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.dropout(self.embed(ids) * math.sqrt(self.config.d_model) + self.positions(pos))

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (b, s) -> memory (b, s, d). src_mask (b, s): 1 = token, 0 = padding (default: src != pad)."""
        keys = _key_mask(src, src_mask, self.config.pad_id)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, keys)
        return self.encoder_norm(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src: torch.Tensor,
               src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt (b, t) (starting with BOS) -> logits (b, t, vocab) for the next target token."""
        t = tgt.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt.device).tril()[None, None]  # (1, 1, t, t)
        keys = _key_mask(src, src_mask, self.config.pad_id)
        y = self._embed(tgt)
        for layer in self.decoder:
            y = layer(y, memory, causal, keys)
        return self.decoder_norm(y) @ self.embed.weight.T  # (b, t, vocab): the shared embedding, transposed

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt, self.encode(src, src_mask), src, src_mask)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(b, ≤ max_len) target ids after BOS, each row ending at its EOS (then padding)."""
        memory = self.encode(src, src_mask)
        cfg = self.config
        out = torch.full((src.shape[0], 1), cfg.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(out, memory, src, src_mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == cfg.eos_id
            if done.all():
                break
        return out[:, 1:]


def _key_mask(src: torch.Tensor, src_mask: torch.Tensor | None, pad_id: int) -> torch.Tensor:
    """(b, 1, 1, s) bool: which source positions may be attended to."""
    real = (src != pad_id) if src_mask is None else src_mask.bool()
    return real[:, None, None, :]


def paper_base_config() -> EncoderDecoderConfig:
    """Transformer (base) of Table 3: N=6, d_model=512, d_ff=2048, h=8, dropout 0.1, ~65 M parameters."""
    return EncoderDecoderConfig()
