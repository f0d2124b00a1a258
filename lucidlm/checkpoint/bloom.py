"""BLOOM: ALiBi instead of position embeddings, LayerNorm (also on the embeddings), GELU MLP.

Its fused ``query_key_value`` interleaves per head: the output axis is laid out as
(heads, [q, k, v], head_dim), not as [all q | all k | all v].
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .family import Family, Rule, check_unsupported, common_fields, common_hf_fields, require


def bloom_config(hf: dict) -> ModelConfig:
    dim = hf.get("hidden_size") or hf.get("n_embed")
    require(hf, "vocab_size", "n_layer", "n_head")
    check_unsupported(hf, {"apply_residual_connection_post_layernorm": False, "pretraining_tp": 1})
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"], ffn_dim=4 * dim,
        max_seq_len=hf.get("seq_length", 2048), positions="alibi", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh", gated_mlp=False, mlp_bias=True,
        attn_qkv_bias=True, attn_out_bias=True, embed_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), **common_fields(hf),
    )


def bloom_hf_config(cfg: ModelConfig) -> dict:
    return {
        "model_type": "bloom", "architectures": ["BloomForCausalLM"], "hidden_size": cfg.dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "layer_norm_epsilon": cfg.norm_eps,
        "seq_length": cfg.max_seq_len, **common_hf_fields(cfg),
    }


def _bloom_special(cfg: ModelConfig, our_names: list[str]) -> list[Rule]:
    h, d = cfg.n_heads, cfg.head_dim

    def split(ts):  # (h·3·d, ...) -> 3 × (h·d, ...)
        t = ts[0]
        per_head = t.view(h, 3, d, *t.shape[1:])
        return [per_head[:, j].reshape(h * d, *t.shape[1:]) for j in range(3)]

    def fuse(ts):
        stacked = torch.stack([t.view(h, d, *t.shape[1:]) for t in ts], dim=1)  # (h, 3, d, ...)
        return [stacked.reshape(3 * h * d, *ts[0].shape[1:])]

    return [
        Rule(tuple(f"blocks.{i}.attn.{p}_proj.{kind}" for p in "qkv"),
             (f"transformer.h.{i}.self_attention.query_key_value.{kind}",), split, fuse)
        for i in range(cfg.n_layers) for kind in ("weight", "bias")
    ]


FAMILIES = [Family(
    ("bloom",), bloom_config, bloom_hf_config,
    renames=[
        (r"embed\.weight", r"transformer.word_embeddings.weight"),
        (r"embed_norm\.(.*)", r"transformer.word_embeddings_layernorm.\1"),
        (r"norm\.(.*)", r"transformer.ln_f.\1"),
        (r"lm_head\.weight", r"lm_head.weight"),
        (r"blocks\.(\d+)\.attn_norm\.(.*)", r"transformer.h.\1.input_layernorm.\2"),
        (r"blocks\.(\d+)\.mlp_norm\.(.*)", r"transformer.h.\1.post_attention_layernorm.\2"),
        (r"blocks\.(\d+)\.attn\.o_proj\.(.*)", r"transformer.h.\1.self_attention.dense.\2"),
        (r"blocks\.(\d+)\.mlp\.up_proj\.(.*)", r"transformer.h.\1.mlp.dense_h_to_4h.\2"),
        (r"blocks\.(\d+)\.mlp\.down_proj\.(.*)", r"transformer.h.\1.mlp.dense_4h_to_h.\2"),
    ],
    special=_bloom_special,
)]
