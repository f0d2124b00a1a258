"""ModelConfig refuses configs that cannot build a model, and its error names the field at fault."""

from __future__ import annotations

import dataclasses

import pytest

from lucidlm.config import PRESETS, MLAConfig, ModelConfig, MoEConfig, RopeScaling, from_overrides, from_preset

BASE = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=128)


def config_error(**fields) -> str:
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**BASE, **fields})
    return str(info.value)


def test_base_config_is_valid():
    cfg = ModelConfig(**BASE)
    assert (cfg.n_kv_heads, cfg.head_dim) == (4, 16)


@pytest.mark.parametrize("fields, words", [
    (dict(n_kv_heads=3), ["n_heads (4)", "n_kv_heads (3)", "multiple"]),
    (dict(n_heads=6, dim=96, n_kv_heads=4), ["n_heads (6)", "n_kv_heads (4)"]),
    (dict(moe=dict(n_experts=4, top_k=5)), ["MoEConfig.top_k", "n_experts=4", "got 5"]),
    (dict(moe=dict(n_experts=4, top_k=0)), ["MoEConfig.top_k", "got 0"]),
    (dict(moe=dict(n_experts=6, n_groups=4)), ["MoEConfig.n_experts (6)", "n_groups (4)"]),
    (dict(head_dim=15), ["ModelConfig.head_dim", "even", "15"]),
    (dict(dim=60), ["ModelConfig.head_dim", "even", "15"]),  # derived: 60 // 4
    (dict(mla=dict(qk_rope_head_dim=7)), ["MLAConfig.qk_rope_head_dim", "even", "7"]),
    (dict(vocab_size=0), ["ModelConfig.vocab_size", ">= 1", "0"]),
    (dict(n_layers=-1), ["ModelConfig.n_layers", "-1"]),
    (dict(ffn_dim=0), ["ModelConfig.ffn_dim"]),
    (dict(max_seq_len=0), ["ModelConfig.max_seq_len"]),
    (dict(dim="64"), ["ModelConfig.dim", "integer", "'64'"]),
    (dict(n_heads=4.0), ["ModelConfig.n_heads", "4.0"]),
    (dict(n_kv_heads=True), ["ModelConfig.n_kv_heads", "True"]),
    (dict(sliding_window=0), ["ModelConfig.sliding_window", "0"]),
    (dict(activation="swish"), ["ModelConfig.activation", "'swish'", "silu", "gelu_tanh"]),
    (dict(norm="batchnorm"), ["ModelConfig.norm", "'batchnorm'", "rmsnorm", "layernorm"]),
    (dict(positions="xpos"), ["ModelConfig.positions", "'xpos'", "alibi"]),
    (dict(norm_placement="middle"), ["ModelConfig.norm_placement", "'middle'", "sandwich"]),
    (dict(rope_scaling=dict(type="longrope")), ["rope_scaling.type", "'longrope'", "yarn", "llama3"]),
    # combinations of architectural options that have no meaning together
    (dict(mla=dict(qk_rope_head_dim=8), positions="alibi"), ["ModelConfig.mla", "positions='rope'", "'alibi'"]),
    (dict(mla=dict(qk_rope_head_dim=8), positions="learned"), ["ModelConfig.mla", "'learned'"]),
    (dict(dual_chunk=dict(chunk_size=32, local_window=4), sliding_window=8), ["dual_chunk", "sliding_window=8"]),
    (dict(dual_chunk=dict(chunk_size=32, local_window=4), mla=dict(qk_rope_head_dim=8)), ["dual_chunk", "mla="]),
    (dict(dual_chunk=dict(chunk_size=32, local_window=4), positions="alibi"), ["dual_chunk", "positions='alibi'"]),
    (dict(attention="linear", positions="rope"), ["attention='linear'", "positions='rope'"]),
    (dict(attention="linear", positions="learned", sliding_window=8), ["attention='linear'", "sliding_window=8"]),
    (dict(norm_placement="deepnorm", mla=dict(qk_rope_head_dim=8)), ["deepnorm", "MLA"]),
    (dict(dual_chunk=dict(chunk_size=32)), ["ModelConfig.dual_chunk needs", "local_window"]),
])
def test_invalid_config_names_the_field(fields, words):
    msg = config_error(**fields)
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("fields", [
    dict(head_dim=15, positions="alibi"),  # an odd head_dim is fine without RoPE
    dict(mla=dict(qk_rope_head_dim=8, qk_nope_head_dim=7)),  # only the rotary part must be even
    dict(n_kv_heads=1), dict(n_kv_heads=2),
    dict(moe=dict(n_experts=4, top_k=4)),
    dict(sliding_window=8, sliding_layers=[1]),
    dict(rope_scaling=RopeScaling(type="yarn", factor=4.0)),
])
def test_valid_edge_cases_are_accepted(fields):
    ModelConfig(**{**BASE, **fields})


@pytest.mark.parametrize("nested, cls", [("rope_scaling", RopeScaling), ("moe", MoEConfig), ("mla", MLAConfig)])
def test_unknown_nested_field_is_named(nested, cls):
    msg = config_error(**{nested: {"warp_factor": 9}})
    assert f"ModelConfig.{nested}" in msg and "warp_factor" in msg
    assert "warp_factor" not in {f.name for f in dataclasses.fields(cls)}


def test_from_dict_round_trip_and_unknown_fields():
    cfg = ModelConfig(**BASE, moe=dict(n_experts=4, top_k=2), rope_scaling=dict(type="linear", factor=2.0))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict({**cfg.to_dict(), "n_expertz": 4, "hidden_size": 64})
    msg = str(info.value)
    assert "n_expertz" in msg and "hidden_size" in msg and "unknown ModelConfig fields" in msg


def test_from_overrides_unknown_field():
    base = ModelConfig(**BASE)
    for call in (lambda: from_overrides(base, {"hidden_size": 128}), lambda: base.replace(hidden_size=128)):
        with pytest.raises(ValueError, match="unknown ModelConfig field 'hidden_size'"):
            call()


def test_from_overrides_merges_nested_changes_and_validates():
    base = ModelConfig(**BASE, moe=dict(n_experts=4, top_k=2, aux_loss_coef=0.5))
    cfg = base.replace(moe={"top_k": 3})
    assert (cfg.moe.top_k, cfg.moe.n_experts, cfg.moe.aux_loss_coef) == (3, 4, 0.5)
    assert base.moe.top_k == 2  # the base is not changed
    with pytest.raises(ValueError, match="MoEConfig.top_k"):
        base.replace(moe={"top_k": 9})
    with pytest.raises(ValueError, match=r"ModelConfig\.moe fields: \['topk'\]"):
        base.replace(moe={"topk": 3})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as info:
        from_preset("llama-7b")
    msg = str(info.value)
    assert "'llama-7b'" in msg
    for name in PRESETS:
        assert name in msg


def test_preset_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown ModelConfig field 'layers'"):
        from_preset("llama-125m", tiny=True, layers=3)
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        from_preset("llama-125m", tiny=True, n_kv_heads=3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_and_its_tiny_variant_is_valid(name):
    for cfg in (from_preset(name), from_preset(name, tiny=True)):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
