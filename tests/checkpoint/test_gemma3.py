"""Gemma 3 (text only, model_type ``gemma3_text``) against transformers' Gemma3ForCausalLM.

Tiny random models (weights ~ N(0, 0.3), float32) whose sliding windows are shorter than the
inputs, so both the window and the sliding layers' own RoPE base change the logits. The family's
base config is in ``hf_models.FAMILIES`` (it also runs the shared parity and round-trip tables).
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_parity import (
    assert_close,
    hf_checkpoint,
    hf_logits,
    left_padded,
    max_diff,
    ours,
    random_hf_model,
    random_ids,
)
from tiny_lm import tiny_model
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

import lucidlm
from lucidlm.checkpoint import CheckpointError, load_model, save_model
from lucidlm.checkpoint.gemma3 import gemma3_config
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.reference import greedy_no_cache
from lucidlm.model.transformer import Transformer

ATOL = 1e-5
SEQ = 20  # every window below is shorter
# overrides of hf_models' gemma3_text config (2 layers: sliding then full, window 4, linear RoPE scaling
# on the global layer, query_pre_attn_scalar 32 with head_dim 16)
CONFIGS = {
    "base": {},
    # transformers' default layer_types: five sliding layers, then a global one, then sliding again
    "default-layer-types": dict(num_hidden_layers=7, layer_types=None, sliding_window=3),
    "softcap": dict(final_logit_softcapping=5.0),
    "mqa-bias-untied": dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False),
    "both-ropes-scaled": dict(rope_parameters=dict(
        full_attention=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=64),
        sliding_attention=dict(rope_type="linear", rope_theta=1e4, factor=2.0))),
}


def _check_logits(hf, model, seq: int = SEQ) -> float:
    ids = random_ids(seq=seq)
    diff = assert_close(ours(model, ids), hf_logits(hf, ids), atol=ATOL)
    padded, mask, positions = left_padded(ids)
    theirs = hf_logits(hf, padded, attention_mask=mask, position_ids=positions)
    mine = ours(model, padded, attention_mask=mask)
    real = mask.bool()
    return max(diff, assert_close(mine[real], theirs[real], atol=ATOL, what="left-padded logits"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf, loaded = hf_checkpoint("gemma3_text", tmp_path, **CONFIGS[name])
    cfg = loaded.config
    assert cfg.norm_placement == "sandwich" and cfg.qk_norm and cfg.norm_unit_offset and cfg.embed_scale
    assert cfg.sliding_layers == tuple(i for i, t in enumerate(hf.config.layer_types) if t == "sliding_attention")
    assert cfg.sliding_window < SEQ and cfg.attn_scale == 32**-0.5
    _check_logits(hf, loaded.model)


def _variant(model: Transformer, **overrides) -> Transformer:
    """The same weights under a changed config."""
    other = Transformer(model.config.replace(**overrides)).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_window_local_rope_and_softcap_each_matter(tmp_path):
    """On the same weights, dropping the window, the sliding layers' own RoPE, or the final softcap
    each moves the logits far beyond the tolerance: the parity above is not by accident."""
    hf, loaded = hf_checkpoint("gemma3_text", tmp_path, final_logit_softcapping=5.0)
    model, ids = loaded.model, random_ids(seq=SEQ)
    mine = ours(model, ids)
    assert loaded.config.sliding_rope_theta == 1e4 and loaded.config.rope_theta == 1e6
    for change in (dict(sliding_window=None, sliding_layers=None), dict(sliding_rope_theta=None),
                   dict(logit_softcap=None)):
        assert max_diff(mine, ours(_variant(model, **change), ids)) > 1e-2, change
    assert mine.abs().max() <= 5.0


def test_transformers_4_config_dialect(tmp_path):
    """A 4.x config.json (rope_theta, rope_local_base_freq, rope_scaling for the global layers,
    sliding_window_pattern instead of layer_types, torch_dtype) loads like the 5.x file."""
    hf, loaded = hf_checkpoint("gemma3_text", tmp_path, num_hidden_layers=4,
                               layer_types=["sliding_attention", "full_attention"] * 2)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config.pop("layer_types")
    config.pop("_sliding_window_pattern", None)
    full = rope["full_attention"]
    config.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                  rope_scaling=full, sliding_window_pattern=2, torch_dtype=config.pop("dtype"))
    path.write_text(json.dumps(config))
    legacy = load_model(tmp_path)
    assert legacy.config == loaded.config and legacy.config.rope_scaling.type == "linear"
    assert Gemma3TextConfig.from_pretrained(tmp_path).layer_types == hf.config.layer_types  # same reading
    ids = random_ids(seq=SEQ)
    assert torch.equal(ours(legacy.model, ids), ours(loaded.model, ids))
    assert_close(ours(legacy.model, ids), hf_logits(hf, ids), atol=ATOL)


@pytest.mark.parametrize("change,message", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),  # EmbeddingGemma
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4)), "keyed by layer type"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "unsupported layer_types"),
    (dict(layer_types=["sliding_attention"]), "1 layer_types for 2 layers"),
])
def test_refuses_configs_it_would_compute_differently(change, message, tmp_path):
    hf = random_hf_model("gemma3_text")
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 11, 64, 2], [64, 2], [11, 12, 13, 14, 15, 16]]
NEW = 16


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the log-probabilities it gave them."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):]
    logprobs = torch.stack([step[0].log_softmax(-1)[t] for step, t in zip(out.logits, tokens)])
    return tokens.tolist(), logprobs


# untied embeddings: with tied ones, random Gemma models mostly echo their last token
@pytest.mark.parametrize("name", ["base", "default-layer-types", "softcap"])
def test_cached_greedy_matches_transformers_generate(name, tmp_path):
    """KV-cached greedy decoding (left-padded batch, prefill in chunks of 3, sliding rings that
    wrap) gives transformers' tokens and log-probabilities (softcapped ones included)."""
    hf, loaded = hf_checkpoint("gemma3_text", tmp_path, **CONFIGS[name], tie_word_embeddings=False)
    got = Generator(loaded.model, prefill_chunk=3).generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    for prompt, completion in zip(PROMPTS, got):
        tokens, logprobs = _hf_greedy(hf, prompt, NEW)
        assert completion.token_ids == tokens
        assert len(set(tokens)) > NEW // 2  # a real continuation, not one token repeated
        assert_close(torch.as_tensor(completion.logprobs), logprobs, atol=ATOL, what="logprobs")


def test_preset_cached_decode_equals_recomputation():
    """The tiny gemma3-270m preset: the cached engine (two RoPE tables, sliding rings) gives the
    tokens of recomputing every prefix without a cache."""
    model = tiny_model("gemma3-270m", n_layers=3, sliding_window=4, sliding_layers=(0, 2), tie_embeddings=False)
    assert model.sliding_rotary is not None
    got = Generator(model, prefill_chunk=3).generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    for prompt, completion in zip(PROMPTS, got):
        assert completion.token_ids == greedy_no_cache(model, prompt, NEW)


@pytest.mark.parametrize("written_by", ["original", "family"])
def test_save_round_trip(written_by, tmp_path):
    """transformers -> lucidlm -> save_model -> transformers and lucidlm, with config.json copied
    from the source or written from the lucidlm config."""
    hf, loaded = hf_checkpoint("gemma3_text", tmp_path / "hf", **CONFIGS["default-layer-types"],
                               final_logit_softcapping=5.0)
    hf_config = loaded.hf_config if written_by == "original" else None
    out = save_model(loaded.model, tmp_path / "out", family=loaded.family, hf_config=hf_config)
    again = load_model(out)
    assert again.config == loaded.config
    ids = random_ids(seq=SEQ)
    assert torch.equal(ours(again.model, ids), ours(loaded.model, ids))
    reread = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reread.config.layer_types == hf.config.layer_types
    assert_close(hf_logits(reread, ids), hf_logits(hf, ids), atol=ATOL)


def test_bfloat16_close_to_transformers(tmp_path):
    """bfloat16 end to end (the √hidden embedding scale rounded to bfloat16, as transformers does)."""
    hf, _ = hf_checkpoint("gemma3_text", tmp_path)
    loaded = load_model(tmp_path, dtype="bfloat16")
    ids = random_ids(seq=SEQ)
    mine, theirs = ours(loaded.model, ids), hf_logits(hf.to(torch.bfloat16), ids)
    assert mine.dtype == torch.bfloat16
    assert max_diff(mine, theirs) <= 0.02 * theirs.float().abs().max().item()


# google/gemma-3-270m's config.json fields that differ from Gemma3TextConfig's defaults
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                   sliding_window=512, query_pre_attn_scalar=256)


def test_gemma3_270m_preset_is_what_transformers_builds():
    hf_config = Gemma3TextConfig(**GEMMA3_270M)
    assert hf_config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert hf_config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    preset = lucidlm.from_preset("gemma3-270m")
    read = gemma3_config({**hf_config.to_dict(), "dtype": "float32"})
    assert read == preset.replace(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in Gemma3ForCausalLM(hf_config).parameters())
        assert Transformer(preset).num_parameters() == hf_count == 268_098_176
