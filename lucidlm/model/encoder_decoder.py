"""The original Transformer (Vaswani et al. 2017, "Attention Is All You Need"): an encoder–decoder
assembled from the pieces of the decoder-only models (``Attention``, ``MLP``, ``LayerNorm``, the
sinusoidal table, the KV cache) plus ``CrossAttention``.

    src ─embed·√d + PE─dropout─▶ [self-attn (source padding mask) → FFN] × N ───────────────▶ memory
    tgt ─embed·√d + PE─dropout─▶ [causal self-attn → cross-attn(memory) → FFN] × N ─▶ Eᵀ ─▶ logits

Every sublayer is wrapped as LayerNorm(x + Dropout(sublayer(x))): post-norm, as in the paper (§3.1,
§5.4). ``norm_placement="pre"`` gives x + Dropout(sublayer(LayerNorm(x))) with a final LayerNorm on
each stack, the later variant that trains deep stacks without a long warmup. The FFN is
max(0, x W1 + b1) W2 + b2 (§3.3). With one vocabulary (the paper's shared source–target BPE) one
matrix embeds source and target tokens and, transposed, projects to the logits (§3.4). The paper's
attention projections have no bias (head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)); ``attn_bias``
adds them, as torch.nn does. Dropout (§5.4): on embeddings + positions and on each sublayer's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, paper_preset
from .absolute_positions import SinusoidalPositions
from .attention import Attention
from .cross_attention import CrossAttention
from .kv_cache import KVCache
from .linear import Linear
from .masks import build_mask, positions_from_attention_mask
from .mlp import MLP
from .norm import LayerNorm


@dataclass
class EncoderDecoderConfig:
    vocab_size: int = 37000  # source vocabulary; also the target one unless tgt_vocab_size is set
    tgt_vocab_size: int | None = None  # None: one shared vocabulary, one embedding matrix (§3.4)
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1  # P_drop: on embeddings + positions and on every sublayer output
    max_len: int = 512  # longest source or target sequence (rows of the sinusoidal table)
    pad_id: int = 0
    bos_id: int = 1  # the decoder's first input token
    eos_id: int = 2
    tie_embeddings: bool = True  # output projection = target embedding, transposed (§3.4)
    norm_placement: Literal["post", "pre"] = "post"
    norm_eps: float = 1e-5
    attn_bias: bool = False  # biases on the Q/K/V/output projections (torch.nn.MultiheadAttention has them)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "ffn_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderDecoderConfig.{name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.norm_placement not in ("post", "pre"):
            raise ValueError(f"norm_placement must be 'post' or 'pre', got {self.norm_placement!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < min(self.vocab_size, self.target_vocab_size):
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary")

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    def layer_config(self) -> ModelConfig:
        """The decoder-only config whose ``Attention``, ``MLP`` and ``KVCache`` have this model's layer
        shapes: multi-head attention without positions (they are added to the embeddings), ReLU FFN."""
        return ModelConfig(
            vocab_size=self.target_vocab_size, dim=self.d_model, n_layers=self.n_decoder_layers,
            n_heads=self.n_heads, ffn_dim=self.ffn_dim, max_seq_len=self.max_len, positions="none",
            norm="layernorm", norm_eps=self.norm_eps, norm_placement=self.norm_placement,
            attn_qkv_bias=self.attn_bias, attn_out_bias=self.attn_bias,
            activation="relu", gated_mlp=False, mlp_bias=True,
        )


# Table 3 of the paper. Parameter counts with its 37 k shared English–German vocabulary: base 65 M,
# big 213 M (ours: 63.1 M and 213.9 M; the paper does not say exactly what it counted).
PRESETS: dict[str, dict[str, Any]] = {
    "transformer-base": dict(),
    "transformer-big": dict(d_model=1024, n_heads=16, ffn_dim=4096, dropout=0.3),
}


def encoder_decoder_preset(name: str, **overrides: Any) -> EncoderDecoderConfig:
    """A paper configuration by name (``transformer-base``, ``transformer-big``), fields overridable."""
    return paper_preset(EncoderDecoderConfig, PRESETS, name, overrides)


def transformer_base(**overrides: Any) -> EncoderDecoderConfig:
    """Transformer (base): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, shared 37 k vocabulary."""
    return encoder_decoder_preset("transformer-base", **overrides)


class Sublayer(nn.Module):
    """A residual connection around ``f`` with its LayerNorm and dropout."""

    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.post = cfg.norm_placement == "post"
        self.norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.post:
            return self.norm(x + self.dropout(f(x)))  # LayerNorm(x + Sublayer(x)), the paper
        return x + self.dropout(f(self.norm(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        shapes = cfg.layer_config()
        self.self_attn = Attention(shapes)
        self.ffn = MLP(shapes)
        self.attn_sub, self.ffn_sub = Sublayer(cfg), Sublayer(cfg)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """x (batch, src_len, d) -> same shape. src_mask bool (batch, 1, 1, src_len), True = real token."""
        x = self.attn_sub(x, lambda h: self.self_attn(h, None, src_mask))  # bidirectional: no causal mask
        return self.ffn_sub(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig, layer: int = 0) -> None:
        super().__init__()
        shapes = cfg.layer_config()
        self.self_attn = Attention(shapes, layer)  # layer: the KV-cache layer it writes while generating
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.attn_bias)
        self.ffn = MLP(shapes)
        self.self_sub, self.cross_sub, self.ffn_sub = Sublayer(cfg), Sublayer(cfg), Sublayer(cfg)

    def forward(
        self,
        y: torch.Tensor,  # (batch, tgt_len, d)
        self_mask: torch.Tensor,  # bool (batch, 1, tgt_len, keys): causal
        memory_kv: tuple[torch.Tensor, torch.Tensor],  # this layer's CrossAttention.project_memory(memory)
        cross_mask: torch.Tensor | None,  # bool (batch, 1, 1, src_len), True = real source token
        cache: KVCache | None = None,  # generating: earlier target tokens' self-attention keys/values
    ) -> torch.Tensor:
        y = self.self_sub(y, lambda h: self.self_attn(h, None, self_mask, None, cache))  # no peeking ahead
        y = self.cross_sub(y, lambda h: self.cross_attn(h, memory_kv, cross_mask))  # read the source
        return self.ffn_sub(y, self.ffn)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        # A shared vocabulary has one matrix for source, target and (tied) output: registered once, so
        # the state dict holds no aliases (safetensors refuses them).
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tgt_embed = None if cfg.tgt_vocab_size is None else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.positions = SinusoidalPositions(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_decoder_layers))
        # pre-norm stacks end with a norm; post-norm outputs are normalised already
        pre = cfg.norm_placement == "pre"
        self.encoder_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps) if pre else nn.Identity()
        self.decoder_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps) if pre else nn.Identity()
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.target_vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform matrices (tensor2tensor, torch.nn.Transformer; the paper does not say), zero
        biases, unit norm gains; embeddings N(0, 1/d_model), so that embedding·√d has unit scale like
        the sinusoids it is added to, and tied logits h·Eᵀ start near O(1)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.xavier_uniform_(p, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        for embed in [e for e in (self.src_embed, self.tgt_embed) if e is not None]:
            nn.init.normal_(embed.weight, 0.0, self.config.d_model**-0.5, generator=generator)

    @property
    def target_embed(self) -> nn.Embedding:
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- encoder ------------------------------------------------------------------------------
    def source_mask(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, src_len) bool, True = real token: ``src_mask`` if given, else src_ids != pad_id."""
        return (src_ids != self.config.pad_id) if src_mask is None else src_mask.bool()

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src_ids (batch, src_len) -> memory (batch, src_len, d_model).

        src_mask (batch, src_len): 1 = token, 0 = padding; default src_ids != pad_id. Padded keys are
        never attended and positions skip padding, so a padded row encodes its tokens as the row alone.
        """
        self._check_len(src_ids.shape[1])
        real = self.source_mask(src_ids, src_mask)
        x = self._embed(self.src_embed, src_ids, positions_from_attention_mask(real))  # (b, s, d)
        keys = real[:, None, None, :]  # (b, 1, 1, s): the same padding mask for every query
        for layer in self.encoder:
            x = layer(x, keys)
        return self.encoder_norm(x)

    # --- decoder ------------------------------------------------------------------------------
    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt_ids (batch, tgt_len), starting with BOS -> logits (batch, tgt_len, tgt_vocab) of the next token.

        src_mask (batch, src_len): the mask ``encode`` used (None: every memory position is a real token).
        tgt_mask (batch, tgt_len): 1 = token, 0 = padding; right padding needs none (causal attention
        never reaches the padding after a row's tokens), left padding does.
        """
        b, t = tgt_ids.shape
        self._check_len(t)
        dev = tgt_ids.device
        self_mask = build_mask(t, t, batch=b, device=dev, key_padding=tgt_mask)  # (b, 1, t, t) causal
        positions = torch.arange(t, device=dev)[None] if tgt_mask is None else positions_from_attention_mask(tgt_mask)
        cross_mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (b, 1, 1, s)
        return self._decode(tgt_ids, positions, self_mask, self._memory_kv(memory), cross_mask)

    def _memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values, (batch, heads, src_len, head_dim) each."""
        return [layer.cross_attn.project_memory(memory) for layer in self.decoder]

    def _decode(self, tgt_ids: torch.Tensor, positions: torch.Tensor, self_mask: torch.Tensor,
                memory_kv: list[tuple[torch.Tensor, torch.Tensor]], cross_mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """tgt_ids (b, t) at positions (b or 1, t) -> logits (b, t, tgt_vocab)."""
        y = self._embed(self.target_embed, tgt_ids, positions)  # (b, t, d)
        for layer, kv in zip(self.decoder, memory_kv):
            y = layer(y, self_mask, kv, cross_mask, cache)
        y = self.decoder_norm(y)
        if self.lm_head is None:  # tied: the target embedding, transposed (§3.4)
            return F.linear(y, self.target_embed.weight)  # (b, t, tgt_vocab)
        return self.lm_head(y)

    def _embed(self, embed: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (b, n), positions (b or 1, n) -> (b, n, d): token·√d_model + PE, then dropout (§3.4, §5.4)."""
        return self.dropout(embed(ids) * math.sqrt(self.config.d_model) + self.positions(positions))

    def _check_len(self, n: int) -> None:
        if n > self.config.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_len={self.config.max_len}")

    # --- both ---------------------------------------------------------------------------------
    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: src_ids (batch, src_len), tgt_ids (batch, tgt_len) -> logits (batch, tgt_len, tgt_vocab);
        logits[:, i] predict the target token after tgt_ids[:, i]. Masks as in ``encode`` and ``decode``."""
        src_mask = self.source_mask(src_ids, src_mask)
        return self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask, tgt_mask)

    @torch.no_grad()
    def greedy(self, src_ids: torch.Tensor, max_len: int, src_mask: torch.Tensor | None = None,
               use_cache: bool = True, return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding: (batch, n ≤ max_len) target ids after BOS, each row ending at its EOS, then pad_id;
        with ``return_logits`` also the logits each step chose from, (batch, n, tgt_vocab) (after a row's
        EOS they score tokens that were never used).

        The source is encoded once and its cross-attention keys/values projected once. With the cache
        each step runs the decoder on the newest token only (earlier self-attention keys/values are
        stored); without it the whole prefix is recomputed each step (the reference the cache must equal).
        """
        cfg = self.config
        self._check_len(max_len)
        b, dev = src_ids.shape[0], src_ids.device
        src_mask = self.source_mask(src_ids, src_mask)
        memory = self.encode(src_ids, src_mask)
        memory_kv, cross_mask = self._memory_kv(memory), src_mask[:, None, None, :]
        cache = KVCache(cfg.layer_config(), b, max_len, memory.dtype, dev) if use_cache else None
        out = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=dev)  # (b, 1 + generated)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        scores = []
        for step in range(max_len):
            if cache is None:
                t = out.shape[1]
                causal = build_mask(t, t, device=dev)  # (1, 1, t, t)
                logits = self._decode(out, torch.arange(t, device=dev)[None], causal, memory_kv, cross_mask)
            else:
                plan = cache.begin(range(b), 1)  # masks (b, 1, 1, step + 1) over the cached tokens
                position = torch.full((1, 1), step, device=dev)
                logits = self._decode(out[:, -1:], position, plan.masks[False], memory_kv, cross_mask, cache)
            scores.append(logits[:, -1])  # (b, tgt_vocab)
            nxt = logits[:, -1].argmax(-1).masked_fill(done, cfg.pad_id)  # (b,); finished rows get padding
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == cfg.eos_id
            if done.all():
                break
        return (out[:, 1:], torch.stack(scores, 1)) if return_logits else out[:, 1:]
