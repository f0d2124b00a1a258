"""The decoder-only Transformer, readable top to bottom.

    ids ─embed(×√d)─(+abs pos)─(norm)─▶ [Block × n_layers] ─norm─▶ lm_head ─▶ logits

A Block is attention then feed-forward (dense MLP or MoE), each wrapped in a residual connection
with its norm placed pre (GPT-2, Llama: x + f(norm(x))), post (original Transformer:
norm(x + f(x))), sandwich (Gemma-2/3: x + norm(f(norm(x)))) or deepnorm (DeepNet: norm(α·x + f(x)),
see deepnorm.py).
Positions enter as RoPE tables shared by all layers (Gemma 3: one table for the sliding-window
layers, another for the global ones), an ALiBi bias, or absolute embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .absolute_positions import LearnedPositions, SinusoidalPositions
from .alibi import alibi_bias, alibi_slopes
from .attention import Attention
from .deepnorm import deepnorm_alpha, deepnorm_init_
from .kv_cache import KVCache, StepPlan
from .linear import Linear
from .masks import build_mask, positions_from_attention_mask
from .mla import MultiHeadLatentAttention
from .mlp import MLP
from .moe import MoE
from .norm import make_norm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, seq, dim)
    aux_loss: torch.Tensor | None = None  # sum of the MoE load-balancing losses (unweighted)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.sliding = cfg.is_sliding(layer)
        self.attn = MultiHeadLatentAttention(cfg, layer) if cfg.mla else Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)
        self.attn_norm = make_norm(cfg)
        self.mlp_norm = make_norm(cfg)
        if self.placement == "sandwich":
            self.attn_post_norm = make_norm(cfg)
            self.mlp_post_norm = make_norm(cfg)
        if self.placement == "deepnorm":
            self.residual_scale = deepnorm_alpha(cfg.n_layers)  # α

    def ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feed-forward output and, for MoE, its load-balancing loss."""
        out = self.mlp(x)
        return out if isinstance(out, tuple) else (out, None)

    def forward(self, x, rope, mask, bias=None, cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch, seq, dim) -> (same shape, MoE aux loss or None)."""
        if self.placement == "deepnorm":  # post-norm with the residual up-weighted by α
            x = self.attn_norm(self.residual_scale * x + self.attn(x, rope, mask, bias, cache))
            h, aux = self.ffn(x)
            return self.mlp_norm(self.residual_scale * x + h), aux
        if self.placement == "post":
            x = self.attn_norm(x + self.attn(x, rope, mask, bias, cache))
            h, aux = self.ffn(x)
            return self.mlp_norm(x + h), aux
        h = self.attn(self.attn_norm(x), rope, mask, bias, cache)
        x = x + (self.attn_post_norm(h) if self.placement == "sandwich" else h)
        h, aux = self.ffn(self.mlp_norm(x))
        return x + (self.mlp_post_norm(h) if self.placement == "sandwich" else h), aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.positions: nn.Module | None = None
        if cfg.positions == "learned":
            self.positions = LearnedPositions(cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_buffers()
        self.tie_weights()

    # --- set-up ------------------------------------------------------------------------------
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-learned tables; needed after building on the meta device."""
        cfg = self.config
        self.rotary = self.sliding_rotary = None
        if cfg.positions == "rope":
            dim = cfg.mla.qk_rope_head_dim if cfg.mla else cfg.head_dim
            self.rotary = RotaryEmbedding(dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len).to(device)
            if cfg.sliding_rope_theta is not None:
                self.sliding_rotary = RotaryEmbedding(dim, cfg.sliding_rope_theta, cfg.sliding_rope_scaling,
                                                      cfg.max_seq_len).to(device)
        if cfg.positions == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.max_seq_len, cfg.dim).to(device)
        self.alibi = alibi_slopes(cfg.n_heads).to(device) if cfg.positions == "alibi" else None

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and isinstance(self.lm_head, Linear):  # a quantized head holds its own copy
            self.lm_head.weight = self.embed.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init: N(0, init_std) for matrices (output projections scaled by 1/sqrt(2·layers),
        as GPT-2 does), zeros for biases, ones for norm weights (zeros for Gemma-style offsets);
        DeepNorm then re-initialises the blocks' matrices (deepnorm.py)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                scale = 1 / math.sqrt(2 * self.config.n_layers) if residual_out else 1
                nn.init.normal_(p, 0.0, std * scale, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.constant_(p, 0.0 if self.config.norm_unit_offset else 1.0)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        if self.config.norm_placement == "deepnorm":  # the DeepNet paper's β-scaled Xavier init
            deepnorm_init_(self.blocks, self.config.n_layers, generator)

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq), 1 = real token, 0 = padding
        position_ids: torch.Tensor | None = None,  # (batch, seq); default skips padding
        prefix_mask: torch.Tensor | None = None,  # (batch, seq) True = bidirectional prefix (prefix-LM)
        *,
        cache: KVCache | None = None,
        slots: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab); ``forward_outputs`` also gives hidden states and the MoE aux loss.

        ``cache``: the tokens continue the sequences held in the cache's ``slots`` (row i → slot
        slots[i]; default 0..batch-1); their K/V are stored and earlier ones attended to. Here
        ``attention_mask`` covers only the new tokens and position ids continue each slot.
        ``last_only``: project only the last position to logits (batch, 1, vocab), as generation needs.
        """
        return self.forward_outputs(input_ids, attention_mask, position_ids, prefix_mask, cache=cache, slots=slots,
                                    last_only=last_only).logits

    def forward_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        slots: Sequence[int] | None = None,
        last_only: bool = False,
        hidden_layers: Sequence[int] = (),
        return_aux_loss: bool = False,
    ) -> ModelOutput:
        """``forward`` as a ``ModelOutput``: the logits, the residual stream after each block of
        ``hidden_layers`` (negative indices count from the last block) and, with ``return_aux_loss``,
        the sum of the MoE load-balancing losses (None for a dense model or without it)."""
        cfg = self.config
        b, s = input_ids.shape
        if s > cfg.max_seq_len and cfg.positions in ("learned", "sinusoidal"):
            raise ValueError(f"sequence of {s} tokens exceeds max_seq_len={cfg.max_seq_len}")
        wanted = self.check_hidden_layers(hidden_layers)
        if cache is not None:
            return self._forward_cached(input_ids, attention_mask, position_ids, wanted, return_aux_loss,
                                        cache, range(b) if slots is None else slots, last_only)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_attention_mask(attention_mask)
            else:
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self._embed(input_ids, position_ids)
        rope = self._rope(position_ids, x.dtype)
        bias = alibi_bias(self.alibi, position_ids, position_ids) if self.alibi is not None else None
        masks = self._masks(b, s, x.device, attention_mask, prefix_mask)
        return self._run_blocks(x, rope, masks, bias, None, wanted, return_aux_loss, last_only)

    def check_hidden_layers(self, layers: Sequence[int]) -> set[int]:
        """The block indices ``layers`` name, negative ones counted from the last block; IndexError
        naming those out of range."""
        n = self.config.n_layers
        out_of_range = [i for i in layers if not -n <= i < n]
        if out_of_range:
            raise IndexError(f"hidden_layers {out_of_range} out of range for {n} blocks")
        return {i % n for i in layers}

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = self.embed(input_ids)  # (b, s, dim)
        if cfg.embed_scale:  # Gemma: scale by sqrt(dim), rounded to the activation dtype
            x = x * torch.tensor(cfg.dim**0.5, dtype=x.dtype)
        if self.positions is not None:
            x = x + self.positions(position_ids).to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def _forward_cached(self, input_ids, attention_mask, position_ids, wanted, return_aux_loss, cache,
                        slots, last_only) -> ModelOutput:
        if cache.cfg is not self.config and cache.cfg != self.config:
            raise ValueError("this KV cache was built for a different model config")
        if self.alibi is not None and any(cache.ring):
            raise ValueError("ALiBi with sliding-window ring caches is not supported")
        b, s = input_ids.shape
        if len(slots) != b:
            raise ValueError(f"{len(slots)} slots given for a batch of {b} rows")
        plan = cache.begin(slots, s, attention_mask, position_ids)
        x = self._embed(input_ids, plan.position_ids)
        return self._planned_blocks(x, plan, cache, wanted, return_aux_loss, last_only)

    def forward_planned(self, input_ids: torch.Tensor, plan: StepPlan, cache: KVCache, *,
                        hidden_layers: tuple[int, ...] = (), last_only: bool = True) -> ModelOutput:
        """The engine's step: the cached forward after ``cache.begin`` placed the tokens. Pure tensor work, so
        that a decode step can be compiled (``torch.compile``) apart from the cache's host-side bookkeeping.
        Always a ``ModelOutput`` (its ``hidden_states`` hold the ``hidden_layers`` asked for)."""
        x = self._embed(input_ids, plan.position_ids)
        return self._planned_blocks(x, plan, cache, self.check_hidden_layers(hidden_layers), False, last_only)

    def _planned_blocks(self, x, plan: StepPlan, cache: KVCache, wanted, return_aux_loss, last_only) -> ModelOutput:
        rope = self._rope(plan.position_ids, x.dtype)
        bias = alibi_bias(self.alibi, plan.position_ids, plan.key_positions) if self.alibi is not None else None
        return self._run_blocks(x, rope, plan.masks, bias, cache, wanted, return_aux_loss, last_only)

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[bool, tuple | None]:
        """The (cos, sin) tables keyed by sliding, like the masks: the same table for every layer
        unless sliding-window layers have a RoPE of their own (Gemma 3)."""
        if self.rotary is None:
            return {False: None, True: None}
        table = self.rotary(position_ids, dtype)
        sliding = self.sliding_rotary(position_ids, dtype) if self.sliding_rotary is not None else table
        return {False: table, True: sliding}

    def _run_blocks(self, x, rope, masks, bias, cache, wanted, return_aux_loss, last_only) -> ModelOutput:
        hidden: dict[int, torch.Tensor] = {}
        aux_total = None
        for i, block in enumerate(self.blocks):
            x, aux = block(x, rope[block.sliding], masks[block.sliding], bias, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
            if i in wanted:
                hidden[i] = x
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return ModelOutput(logits, hidden, aux_total if return_aux_loss else None)

    def _masks(self, b, s, device, attention_mask, prefix_mask) -> dict[bool, torch.Tensor]:
        """The full-attention mask and, when some layer slides, the windowed one; keyed by sliding."""
        common = dict(batch=b, device=device, key_padding=attention_mask, prefix_mask=prefix_mask)
        masks = {False: build_mask(s, s, **common)}
        if self.config.sliding_window is not None:
            masks[True] = build_mask(s, s, window=self.config.sliding_window, **common)
        return masks

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
