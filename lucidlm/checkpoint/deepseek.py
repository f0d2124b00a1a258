"""DeepSeek-V2 and -V3: multi-head latent attention plus DeepSeekMoE (fine-grained routed experts,
shared experts, the first few blocks dense). V3 routes with sigmoid scores, a correction bias and
group-limited top-k over the two best experts of each group."""

from __future__ import annotations

from ..config import MLAConfig, ModelConfig, MoEConfig
from .family import Family, activation, common_fields, common_hf_fields, read_rope, require, write_rope
from .llama_family import LLAMA_RENAMES, _hf_activation


def deepseek_config(hf: dict) -> ModelConfig:
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok")
    v3 = hf["model_type"] == "deepseek_v3"
    theta, scaling = read_rope(hf)
    method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    grouped = method in ("group_limited_greedy", "noaux_tc")
    moe = MoEConfig(
        n_experts=hf.get("n_routed_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        expert_ffn_dim=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts") or 0,
        scoring="sigmoid" if v3 else "softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), score_correction_bias=v3,
        n_groups=(hf.get("n_group") or 1) if grouped else 1, topk_groups=(hf.get("topk_group") or 1) if grouped else 1,
        group_score="top2_sum" if v3 else "max", first_dense_layers=hf.get("first_k_dense_replace", 0),
        layer_freq=hf.get("moe_layer_freq", 1), aux_loss_coef=float(hf.get("aux_loss_alpha", 0.001)),
    )
    mla = MLAConfig(
        kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank"),
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, rope_interleaved=bool(hf.get("rope_interleave", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), activation=activation(hf.get("hidden_act", "silu")),
        attn_qkv_bias=bool(hf.get("attention_bias", False)), attn_out_bias=bool(hf.get("attention_bias", False)),
        mla=mla, moe=moe, **common_fields(hf),
    )


def deepseek_hf_config(kind: str):
    def to_hf(cfg: ModelConfig) -> dict:
        m, a = cfg.moe, cfg.mla
        v3 = kind == "deepseek_v3"
        method = ("noaux_tc" if v3 else "group_limited_greedy") if m.n_groups > 1 else "greedy"
        return {
            "model_type": kind, "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_heads, "intermediate_size": cfg.ffn_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": write_rope(cfg), "rope_interleave": cfg.rope_interleaved,
            "hidden_act": _hf_activation(cfg.activation), "attention_bias": cfg.attn_qkv_bias,
            "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "head_dim": a.qk_rope_head_dim,
            "n_routed_experts": m.n_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.expert_ffn_dim or cfg.ffn_dim, "n_shared_experts": m.n_shared_experts,
            "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.routed_scaling_factor,
            "topk_method": method, "n_group": m.n_groups, "topk_group": m.topk_groups,
            "first_k_dense_replace": m.first_dense_layers, "moe_layer_freq": m.layer_freq,
            "aux_loss_alpha": m.aux_loss_coef, **common_hf_fields(cfg),
        }

    return to_hf


FAMILIES = [
    Family((kind,), deepseek_config, deepseek_hf_config(kind), LLAMA_RENAMES,
           ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
    for kind in ("deepseek_v2", "deepseek_v3")
]
