"""The decoder-only Transformer, readable top to bottom.

    ids ─embed(×√d)─(+abs pos)─(norm)─▶ [Block × n_layers] ─norm─▶ lm_head ─▶ logits

A Block is attention then feed-forward (dense MLP or MoE), each wrapped in a residual connection
with its norm placed pre (GPT-2, Llama: x + f(norm(x))), post (original Transformer:
norm(x + f(x))), sandwich (Gemma-2/3: x + norm(f(norm(x)))) or deepnorm (DeepNet: norm(α·x + f(x)),
see deepnorm.py).
Positions enter as RoPE tables shared by all layers (Gemma 3: one table for the sliding-window
layers, another for the global ones; dual chunk attention: per-chunk tables), an ALiBi bias, T5's learned
relative bias (one table, its bias added in every layer), or absolute embeddings.
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
from .dual_chunk_attention import dual_chunk_rope
from .kv_cache import KVCache, StepPlan
from .linear import Linear
from .linear_attention import LinearAttention
from .masks import build_mask, positions_from_attention_mask
from .mla import MultiHeadLatentAttention
from .mlp import MLP
from .moe import MoE
from .norm import make_norm
from .relative_position_bias import RelativePositionBias
from .rope import RotaryEmbedding
from .shifted_sparse_attention import check_group
from .sparse_attention_masks import sparse_pattern_mask


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
        attention = LinearAttention if cfg.attention == "linear" else Attention
        self.attn = MultiHeadLatentAttention(cfg, layer) if cfg.mla else attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)
        self.attn_norm = make_norm(cfg)
        self.mlp_norm = make_norm(cfg)
        if self.placement == "sandwich":
            self.attn_post_norm = make_norm(cfg)
            self.mlp_post_norm = make_norm(cfg)
        if self.placement == "deepnorm":
            self.residual_scale = deepnorm_alpha(cfg.n_layers)  # α
        # bottleneck adapters on the sublayer outputs, when applied (model/bottleneck_adapter.py)
        self.attn_adapter: nn.Module | None = None
        self.mlp_adapter: nn.Module | None = None

    def attention(self, x, rope, mask, bias=None, cache=None) -> torch.Tensor:
        """The attention output (through its adapter, if any)."""
        out = self.attn(x, rope, mask, bias, cache)
        return out if self.attn_adapter is None else self.attn_adapter(out)

    def ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feed-forward output (through its adapter, if any) and, for MoE, its load-balancing loss."""
        out = self.mlp(x)
        out, aux = out if isinstance(out, tuple) else (out, None)
        return (out if self.mlp_adapter is None else self.mlp_adapter(out)), aux

    def forward(self, x, rope, mask, bias=None, cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch, seq, dim) -> (same shape, MoE aux loss or None)."""
        if self.placement == "deepnorm":  # post-norm with the residual up-weighted by α
            x = self.attn_norm(self.residual_scale * x + self.attention(x, rope, mask, bias, cache))
            h, aux = self.ffn(x)
            return self.mlp_norm(self.residual_scale * x + h), aux
        if self.placement == "post":
            x = self.attn_norm(x + self.attention(x, rope, mask, bias, cache))
            h, aux = self.ffn(x)
            return self.mlp_norm(x + h), aux
        h = self.attention(self.attn_norm(x), rope, mask, bias, cache)
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
        self.relative_position_bias: RelativePositionBias | None = None  # T5: one table for every layer
        if cfg.positions == "relative_bias":
            self.relative_position_bias = RelativePositionBias(cfg.n_heads, cfg.relative_num_buckets,
                                                               cfg.relative_max_distance, cfg.relative_bidirectional)
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
        if prefix_mask is not None and cfg.attention == "linear":
            raise ValueError("prefix_mask needs softmax attention: ModelConfig.attention='linear' is causal only")
        if cfg.s2_attn_group is not None and self.training and cache is None:  # before any work
            check_group(s, cfg.s2_attn_group)
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
        bias = self._position_bias(position_ids, position_ids)
        masks = self._masks(b, s, x.device, attention_mask, prefix_mask)
        if cfg.sparse_attention is not None:  # a fixed pattern over the full-attention layers
            masks[False] = masks[False] & sparse_pattern_mask(cfg, position_ids, position_ids)
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
        if self.relative_position_bias is not None and any(cache.ring):
            raise ValueError("positions='relative_bias' with sliding-window ring caches is not supported")
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
        rope = self._rope(plan.position_ids, x.dtype, plan.key_positions)
        bias = self._position_bias(plan.position_ids, plan.key_positions)
        return self._run_blocks(x, rope, plan.masks, bias, cache, wanted, return_aux_loss, last_only)

    def _position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """The additive bias (batch, heads, q, k) every layer adds to its logits: ALiBi's or T5's, else None."""
        if self.alibi is not None:
            return alibi_bias(self.alibi, q_pos, k_pos)
        if self.relative_position_bias is not None:
            return self.relative_position_bias(q_pos, k_pos)
        return None

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype,
              key_positions: torch.Tensor | None = None) -> dict[bool, tuple | None]:
        """The (cos, sin) tables keyed by sliding, like the masks: the same table for every layer
        unless sliding-window layers have a RoPE of their own (Gemma 3). ``key_positions``: those of the
        keys attended to (default: the tokens themselves), which dual chunk attention needs."""
        if self.rotary is None:
            return {False: None, True: None}
        if self.config.dual_chunk is not None:  # positions per (query, key) pair: model/dual_chunk_attention.py
            keys = position_ids if key_positions is None else key_positions
            table = dual_chunk_rope(self.rotary, position_ids, keys, self.config.dual_chunk, dtype)
            return {False: table, True: table}
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
