"""GPT-2: learned absolute positions, LayerNorm, GELU MLP, fused q/k/v, tied embeddings.

Its linear layers are ``Conv1D`` modules that store weights as (in, out), the transpose of
``nn.Linear``; the fused ``c_attn`` holds q, k and v side by side along the output axis.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .family import Family, Rule, activation, check_unsupported, common_fields, common_hf_fields, require


def gpt2_config(hf: dict) -> ModelConfig:
    require(hf, "vocab_size", "n_embd", "n_layer", "n_head")
    check_unsupported(hf, {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                           "scale_attn_weights": True, "add_cross_attention": False})
    dim = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        ffn_dim=hf.get("n_inner") or 4 * dim, max_seq_len=hf.get("n_positions", 1024), positions="learned",
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf.get("activation_function", "gelu_new")), gated_mlp=False, mlp_bias=True,
        attn_qkv_bias=True, attn_out_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **common_fields(hf),
    )


def gpt2_hf_config(cfg: ModelConfig) -> dict:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.dim, "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim, "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": act, **common_hf_fields(cfg),
    }


def _transpose(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.t() for t in ts]


def _gpt2_special(cfg: ModelConfig, our_names: list[str]) -> list[Rule]:
    def split_qkv(ts):  # c_attn (in, 3·out) -> q, k, v as (out, in); biases (3·out,) -> 3 × (out,)
        t = ts[0]
        return [p.t() for p in t.chunk(3, dim=-1)] if t.dim() == 2 else list(t.chunk(3))

    def fuse_qkv(ts):
        return [torch.cat([p.t() for p in ts], dim=-1)] if ts[0].dim() == 2 else [torch.cat(ts)]

    rules = []
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            rules.append(Rule(tuple(f"{ours}attn.{p}_proj.{kind}" for p in "qkv"), (f"{theirs}attn.c_attn.{kind}",),
                              split_qkv, fuse_qkv))
        for o, t in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            rules.append(Rule((f"{ours}{o}.weight",), (f"{theirs}{t}.weight",), _transpose, _transpose))
    return rules


FAMILIES = [Family(
    ("gpt2",), gpt2_config, gpt2_hf_config,
    renames=[
        (r"embed\.weight", r"transformer.wte.weight"),
        (r"positions\.weight", r"transformer.wpe.weight"),
        (r"norm\.(weight|bias)", r"transformer.ln_f.\1"),
        (r"lm_head\.weight", r"lm_head.weight"),
        (r"blocks\.(\d+)\.attn_norm\.(.*)", r"transformer.h.\1.ln_1.\2"),
        (r"blocks\.(\d+)\.mlp_norm\.(.*)", r"transformer.h.\1.ln_2.\2"),
        (r"blocks\.(\d+)\.attn\.o_proj\.bias", r"transformer.h.\1.attn.c_proj.bias"),
        (r"blocks\.(\d+)\.mlp\.up_proj\.bias", r"transformer.h.\1.mlp.c_fc.bias"),
        (r"blocks\.(\d+)\.mlp\.down_proj\.bias", r"transformer.h.\1.mlp.c_proj.bias"),
    ],
    special=_gpt2_special,
    # old GPT-2 checkpoints store the causal mask as buffers; masks are built, never loaded
    ignored=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
)]
