"""Encoder-only Transformer with a masked-LM head (BERT: Devlin et al. 2019).

    ids ─word + learned position + token type─▶ LayerNorm ─dropout─▶ [EncoderLayer × N] ─▶ hidden
    hidden ─dense─GELU─LayerNorm─▶ ·Eᵀ + b ─▶ logits over the vocabulary at every position

Every position attends to every real token, before and after it (no causal mask: bidirectional);
``attention_mask`` keeps padding out of the keys. The layers are the original Transformer's encoder
layers (``encoder_decoder.EncoderLayer``: post-norm LayerNorm(x + Dropout(sublayer(x))) around
multi-head attention and the feed-forward network), here with biases on every projection and a GELU
FFN, as BERT has them. Positions are learned vectors (``LearnedPositions``, one per position up to
``max_len``), and a second learned table tells the two segments of a sentence pair apart (token
types). The MLM head transforms each hidden state (dense + GELU + LayerNorm) and scores it against
the word embeddings (tied, as BERT's run_pretraining.py does) plus a per-token bias.

Position ids default to 0..seq-1 whatever the padding, as BERT numbers them (its batches are padded
on the right, where this equals counting real tokens). Dropout on attention probabilities is not
applied: ``attend`` (SDPA) is shared with the decoders and runs without it; at inference BERT has none
either, so the logits equal transformers' ``BertForMaskedLM``.

``EncoderConfig`` is a config of its own, as ``EncoderDecoderConfig`` is: ``ModelConfig`` describes a
decoder that the inference engine generates with, and an encoder has nothing to generate. Its
``layer_config()`` gives the ``ModelConfig`` whose ``Attention`` and ``MLP`` have this model's shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Activation, ModelConfig, paper_preset
from .absolute_positions import LearnedPositions
from .encoder_decoder import EncoderLayer
from .linear import Linear
from .mlp import activation_fn
from .norm import LayerNorm


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    d_model: int = 768  # BERT's hidden_size
    n_heads: int = 12
    n_layers: int = 12
    ffn_dim: int = 3072  # intermediate_size
    max_len: int = 512  # learned positions (max_position_embeddings)
    type_vocab_size: int = 2  # token types: segment A / segment B
    activation: Activation = "gelu"  # FFN and MLM-head transform (BERT: exact, erf-based GELU)
    dropout: float = 0.1  # on embeddings and every sublayer output (hidden_dropout_prob)
    norm_eps: float = 1e-12
    tie_embeddings: bool = True  # MLM decoder = word embeddings, transposed
    init_std: float = 0.02  # BERT's initializer_range
    pad_token_id: int | None = 0
    dtype: str = "float32"
    norm_placement: ClassVar[str] = "post"  # BERT's blocks: LayerNorm(x + sublayer(x)), what EncoderLayer reads

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "ffn_dim", "max_len", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EncoderConfig.{name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"EncoderConfig.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"EncoderConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                             f"(vocab_size={self.vocab_size})")
        self.layer_config()  # the layer shapes validate too (activation, sizes)

    def layer_config(self) -> ModelConfig:
        """The decoder-only config whose ``Attention`` and ``MLP`` have this encoder's layer shapes:
        multi-head attention without positions (they are added to the embeddings), biases everywhere,
        a plain (ungated) FFN."""
        return ModelConfig(
            vocab_size=self.vocab_size, dim=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            ffn_dim=self.ffn_dim, max_seq_len=self.max_len, positions="none", norm="layernorm",
            norm_eps=self.norm_eps, norm_placement="post", attn_qkv_bias=True, attn_out_bias=True,
            activation=self.activation, gated_mlp=False, mlp_bias=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Devlin et al. 2019 §3: BERT-base (110 M parameters) and BERT-large (340 M), WordPiece vocabulary of 30522.
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(),
    "bert-large": dict(d_model=1024, n_heads=16, n_layers=24, ffn_dim=4096),
}


def encoder_preset(name: str, **overrides: Any) -> EncoderConfig:
    """A paper configuration by name (``bert-base``, ``bert-large``), fields overridable."""
    return paper_preset(EncoderConfig, PRESETS, name, overrides)


class Encoder(nn.Module):
    """Token ids -> contextual hidden states (batch, seq, d_model): embeddings, then the layers."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = LearnedPositions(cfg.max_len, cfg.d_model)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.embed_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq), 1 = real token, 0 = padding; None: all real
        token_type_ids: torch.Tensor | None = None,  # (batch, seq), segment of each token; None: all 0
        position_ids: torch.Tensor | None = None,  # (batch or 1, seq); None: 0..seq-1
    ) -> torch.Tensor:
        b, s = input_ids.shape
        self._check_inputs(s, input_ids, attention_mask, token_type_ids)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None]  # (1, s)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids) + self.positions(position_ids) + self.token_types(token_type_ids)  # (b, s, d)
        x = self.dropout(self.embed_norm(x))
        # the same key mask for every query: padding is never attended, nothing else is hidden (no causal mask)
        keys = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (b, 1, 1, s)
        for layer in self.layers:
            x = layer(x, keys)
        return x

    def _check_inputs(self, s: int, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None) -> None:
        if s > self.config.max_len:
            raise ValueError(f"sequence of {s} tokens exceeds the encoder's {self.config.max_len} learned positions "
                             "(EncoderConfig.max_len)")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"{name} has shape {list(t.shape)}, input_ids {list(ids.shape)}: they must match")


class MLMHead(nn.Module):
    """hidden (batch, seq, d) -> logits (batch, seq, vocab): dense + activation + LayerNorm, then the decoder
    (the word embeddings, transposed, when tied) plus a bias per vocabulary entry."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.act = activation_fn(cfg.activation)
        self.norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.decoder = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """embedding: the word-embedding matrix (vocab, d), the decoder when tied."""
        h = self.norm(self.act(self.dense(hidden)))
        weight = embedding if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)


class MaskedLM(nn.Module):
    """An encoder and its MLM head: ``forward`` gives, at every position, logits over the token that belongs
    there (trained on the masked positions: see train/masked_lm.py)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.head = MLMHead(cfg)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """BERT's: N(0, init_std) for matrices and embeddings, zero biases, unit LayerNorm gains."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, self.config.init_std, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab). Arguments as in ``Encoder.forward``."""
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        return self.head(hidden, self.encoder.embed.weight)
