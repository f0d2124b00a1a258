"""Tiny random Hugging Face models, built offline from config classes, for parity tests."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
DEEPSEEK_MOE = dict(n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=1, num_experts_per_tok=2)

# model_type -> (config class name, model class name, config overrides on top of TINY)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=32, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters=dict(full_attention=dict(rope_type="linear", rope_theta=1e6, factor=2.0),
                             sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        **MLA, **DEEPSEEK_MOE, q_lora_rank=None, n_shared_experts=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        **MLA, **DEEPSEEK_MOE, q_lora_rank=12, n_group=2, topk_group=1)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)),
}
MUST = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "deepseek_v2"]
SHOULD = ["gemma", "gemma3_text", "qwen3_moe", "deepseek_v3", "bloom"]


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers model of the family; every weight (norms and biases too) is random so
    that a mapping mistake cannot hide behind an init of ones or zeros."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config_cls, model_cls, extra = FAMILIES[kind]
    base = {} if kind in ("gpt2", "bloom") else TINY
    config = getattr(transformers, config_cls)(**{**base, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    return model


def save_hf_model(kind: str, directory: Path, seed: int = 0, **save_kwargs):
    """Build a random model of the family and save it with save_pretrained; returns the model."""
    model = build_hf_model(kind, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model
