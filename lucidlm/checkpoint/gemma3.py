"""Gemma 3, text only (transformers' ``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Llama's tensor layout plus two norms per block, and these differences in config:
sandwich norms (input, post-attention, pre-feedforward, post-feedforward), all RMSNorms with
Gemma's (1 + w) weights, QK-norm included; attention scaled by ``query_pre_attn_scalar``^-1/2;
GeGLU (tanh GELU); embeddings × √hidden; tied embeddings; optional final logit softcapping; and
sliding-window layers (``layer_types``, by default five of every six) whose RoPE has its own base
(10k, unscaled) while the global layers use theirs (1M, where any scaling applies).

config.json comes in two dialects: 5.x ``rope_parameters`` keyed by layer type, or 4.x
``rope_theta`` (global), ``rope_local_base_freq`` (sliding), ``rope_scaling`` (global only) and,
without ``layer_types``, ``sliding_window_pattern``.
"""

from __future__ import annotations

from ..config import ModelConfig
from .errors import CheckpointError
from .family import (
    Family,
    activation,
    check_unsupported,
    common_fields,
    common_hf_fields,
    read_rope,
    require,
    write_rope,
)
from .llama_family import LLAMA_RENAMES

# Llama's names, with Gemma's sandwich norms first (first match wins): its "post_attention_layernorm" follows
# attention, and the feed-forward has its own pre and post norms
RENAMES = [
    (r"blocks\.(\d+)\.attn_post_norm\.(.*)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"blocks\.(\d+)\.mlp_norm\.(.*)", r"model.layers.\1.pre_feedforward_layernorm.\2"),
    (r"blocks\.(\d+)\.mlp_post_norm\.(.*)", r"model.layers.\1.post_feedforward_layernorm.\2"),
    *LLAMA_RENAMES,
]

# transformers' Gemma3TextConfig defaults, for fields a config.json may leave out
DEFAULTS = dict(
    head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096, pad_token_id=0, eos_token_id=1,
    bos_token_id=2,
)
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0
LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(hf: dict) -> list[str]:
    if hf.get("layer_types"):
        unknown = sorted(set(hf["layer_types"]) - set(LAYER_TYPES))
        if unknown:
            raise CheckpointError(f"config.json: unsupported layer_types {unknown}; supported: {list(LAYER_TYPES)}")
        return list(hf["layer_types"])
    pattern = hf.get("sliding_window_pattern", 6)  # 4.x: every pattern-th layer is global
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]


def _rope_per_layer_type(hf: dict) -> dict[str, dict]:
    """{layer type: a config dict ``read_rope`` understands} from either dialect."""
    params = hf.get("rope_parameters")
    if params:
        if not set(params) <= set(LAYER_TYPES):
            raise CheckpointError(f"config.json: gemma3_text rope_parameters must be keyed by layer type "
                                  f"{list(LAYER_TYPES)}, got keys {sorted(params)}")
        full = {"rope_theta": GLOBAL_THETA, **(params.get("full_attention") or {})}
        sliding = {"rope_theta": LOCAL_THETA, **(params.get("sliding_attention") or {})}
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", GLOBAL_THETA)}
        sliding = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", LOCAL_THETA)}
    max_pos = hf["max_position_embeddings"]
    return {kind: {"rope_parameters": p, "max_position_embeddings": max_pos}
            for kind, p in (("full_attention", full), ("sliding_attention", sliding))}


def gemma3_config(hf: dict) -> ModelConfig:
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    # attn_logit_softcapping is not checked: transformers' Gemma3Attention never applies it either
    check_unsupported(hf, {"use_bidirectional_attention": False})
    hf = {**DEFAULTS, **hf}
    types = _layer_types(hf)
    if len(types) != hf["num_hidden_layers"]:
        raise CheckpointError(f"config.json: {len(types)} layer_types for {hf['num_hidden_layers']} layers")
    sliding_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    window = hf["sliding_window"] if sliding_layers and hf["sliding_window"] else None
    rope = _rope_per_layer_type(hf)
    theta, scaling = read_rope(rope["full_attention"])
    sliding_theta, sliding_scaling = read_rope(rope["sliding_attention"])
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf["head_dim"], ffn_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        embed_scale=True, tie_embeddings=bool(hf["tie_word_embeddings"]),
        logit_softcap=hf.get("final_logit_softcapping"),
        rope_theta=theta, rope_scaling=scaling, sliding_rope_theta=sliding_theta, sliding_rope_scaling=sliding_scaling,
        norm_eps=hf["rms_norm_eps"], norm_unit_offset=True, norm_placement="sandwich", qk_norm=True,
        attn_qkv_bias=bias, attn_out_bias=bias, attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        sliding_window=window, sliding_layers=sliding_layers if window else None,
        activation=activation(hf["hidden_activation"]), gated_mlp=True, **common_fields(hf),
    )


def _query_pre_attn_scalar(cfg: ModelConfig) -> float:
    if cfg.attn_scale is None:
        return cfg.head_dim
    scalar = cfg.attn_scale**-2
    return round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar  # 256, not 255.99999999999997


def gemma3_hf_config(cfg: ModelConfig) -> dict:
    if cfg.norm_placement != "sandwich" or not (cfg.qk_norm and cfg.norm_unit_offset and cfg.embed_scale):
        raise CheckpointError("gemma3_text needs sandwich norms, QK-norm, (1 + w) RMSNorm and embed_scale")
    sliding_theta = cfg.rope_theta if cfg.sliding_rope_theta is None else cfg.sliding_rope_theta
    sliding_scaling = cfg.rope_scaling if cfg.sliding_rope_theta is None else cfg.sliding_rope_scaling
    sliding_rope = write_rope(cfg.replace(rope_theta=sliding_theta, rope_scaling=sliding_scaling))
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu",
                              "relu": "relu"}[cfg.activation],
        "attention_bias": cfg.attn_qkv_bias, "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
        "rope_parameters": {"full_attention": write_rope(cfg), "sliding_attention": sliding_rope},
        "sliding_window": cfg.sliding_window or DEFAULTS["sliding_window"],  # unused when no layer slides
        "layer_types": ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)],
        "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": None,
        "use_bidirectional_attention": False, **common_hf_fields(cfg),
    }


FAMILIES = [
    Family(("gemma3_text",), gemma3_config, gemma3_hf_config, RENAMES,
           ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)),
]
