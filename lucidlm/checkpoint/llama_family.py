"""Llama and its descendants, which share one tensor layout:
llama, mistral, qwen2, qwen3, gemma (dense) and mixtral, qwen3_moe (mixture of experts).

They differ only in config: biases (Qwen2's q/k/v), QK-norm (Qwen3), sliding windows
(Mistral, Qwen2/3 ``layer_types``), Gemma's embedding scale and (1 + w) RMSNorm, and the MoE
router/expert names (Mixtral's ``block_sparse_moe.experts.E.w1/w2/w3``).
"""

from __future__ import annotations

from ..config import ModelConfig, MoEConfig
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

LLAMA_RENAMES = [
    (r"embed\.weight", r"model.embed_tokens.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r"blocks\.(\d+)\.attn_norm\.(.*)", r"model.layers.\1.input_layernorm.\2"),
    (r"blocks\.(\d+)\.mlp_norm\.(.*)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"blocks\.(\d+)\.attn\.(.*)", r"model.layers.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.mlp\.(.*)", r"model.layers.\1.mlp.\2"),
]

_MOE = r"model.layers.\1.block_sparse_moe"
MIXTRAL_RENAMES = [
    (r"blocks\.(\d+)\.mlp\.gate\.weight", _MOE + r".gate.weight"),
    (r"blocks\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", _MOE + r".experts.\2.w1.weight"),
    (r"blocks\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight", _MOE + r".experts.\2.w2.weight"),
    (r"blocks\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight", _MOE + r".experts.\2.w3.weight"),
] + LLAMA_RENAMES

# Old checkpoints sometimes carry the RoPE table as a tensor; it is recomputed, never loaded.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _sliding_layers(hf: dict, n_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, layers that use it) from ``layer_types`` (5.x) or Qwen's use_sliding_window +
    max_window_layers (4.x); Mistral/Mixtral slide every layer when sliding_window is set."""
    window = hf.get("sliding_window")
    if hf.get("layer_types"):
        layers = tuple(i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention")
        return (window, layers) if layers and window else (None, None)
    if "use_sliding_window" in hf:  # Qwen2/3 4.x dialect
        if not hf["use_sliding_window"] or not window:
            return None, None
        first = hf.get("max_window_layers", n_layers)
        return window, tuple(range(first, n_layers))
    return (window, None) if window else (None, None)


def llama_like_config(hf: dict) -> ModelConfig:
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    kind = hf["model_type"]
    check_unsupported(hf, {"pretraining_tp": 1})
    theta, scaling = read_rope(hf)
    n_layers = hf["num_hidden_layers"]
    window, sliding_layers = _sliding_layers(hf, n_layers)
    bias = bool(hf.get("attention_bias", False)) and kind not in ("mistral", "mixtral")
    cfg = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation=activation(hf.get("hidden_activation") or hf.get("hidden_act", "silu")),
        attn_qkv_bias=bias, attn_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=window, sliding_layers=sliding_layers, **common_fields(hf),
    )
    if kind == "qwen2":
        cfg.update(attn_qkv_bias=True, attn_out_bias=False)
    if kind in ("qwen3", "qwen3_moe"):
        cfg.update(qk_norm=True)
    if kind == "gemma":
        cfg.update(embed_scale=True, norm_unit_offset=True)
    if kind == "mixtral":
        cfg["moe"] = MoEConfig(
            n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.02), norm_topk_prob=True,
        )
    if kind == "qwen3_moe":
        cfg["moe"] = MoEConfig(
            n_experts=hf.get("num_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
            expert_ffn_dim=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), layer_freq=hf.get("decoder_sparse_step", 1),
            dense_layers=tuple(hf.get("mlp_only_layers") or ()),
        )
    return ModelConfig(**cfg)


def llama_like_hf_config(kind: str):
    def to_hf(cfg: ModelConfig) -> dict:
        hf = {
            "model_type": kind, "architectures": [ARCHITECTURES[kind]], "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": write_rope(cfg), "hidden_act": _hf_activation(cfg.activation),
            "attention_bias": cfg.attn_qkv_bias, "mlp_bias": cfg.mlp_bias, **common_hf_fields(cfg),
        }
        if cfg.sliding_window is not None:
            hf["sliding_window"] = cfg.sliding_window
            if kind in ("qwen2", "qwen3", "qwen3_moe"):
                hf["use_sliding_window"] = True
                hf["layer_types"] = [
                    "sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)
                ]
        if cfg.moe is not None and kind == "mixtral":
            hf.update(num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                      router_aux_loss_coef=cfg.moe.aux_loss_coef)
        if cfg.moe is not None and kind == "qwen3_moe":
            hf.update(num_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                      moe_intermediate_size=cfg.moe.expert_ffn_dim or cfg.ffn_dim,
                      norm_topk_prob=cfg.moe.norm_topk_prob, router_aux_loss_coef=cfg.moe.aux_loss_coef,
                      decoder_sparse_step=cfg.moe.layer_freq, mlp_only_layers=list(cfg.moe.dense_layers))
        return hf

    return to_hf


def _hf_activation(name: str) -> str:
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[name]


ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

FAMILIES = [
    Family((kind,), llama_like_config, llama_like_hf_config(kind),
           MIXTRAL_RENAMES if kind == "mixtral" else LLAMA_RENAMES, ignored=IGNORED)
    for kind in ARCHITECTURES
]
