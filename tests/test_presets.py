"""Presets describe the real models: their parameter counts equal the published ones.

Counted on the meta device, so even DeepSeek-V3 costs no memory.
"""

import pytest
import torch

import lucidlm

PUBLISHED = {  # from the model cards / papers (exact counts where the card gives them)
    "gpt2": 124_439_808,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "gemma-2b": 2_506_172_416,
    "mixtral-8x7b": 46_702_792_704,
    "bloom-560m": 559_214_592,
}
APPROX = {"qwen3-30b-a3b": 30.5e9, "deepseek-v2-lite": 15.7e9, "deepseek-v3": 671e9}


def count(name: str) -> int:
    with torch.device("meta"):
        return lucidlm.Transformer(lucidlm.from_preset(name)).num_parameters()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_is_published_count(name):
    assert count(name) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(APPROX))
def test_moe_preset_parameter_count_matches_paper(name):
    assert count(name) == pytest.approx(APPROX[name], rel=0.005)


@pytest.mark.parametrize("name", sorted(lucidlm.config.PRESETS))
def test_tiny_variant_of_every_preset_runs(name):
    cfg = lucidlm.from_preset(name, tiny=True)
    model = lucidlm.Transformer(cfg)
    model.init_weights()
    logits = model(torch.randint(0, cfg.vocab_size, (2, 9)))
    assert logits.shape == (2, 9, cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name,kind", [("gpt2", "MHA"), ("bloom-560m", "MHA"), ("gemma-2b", "MQA"),
                                       ("llama3-8b", "GQA")])
def test_tiny_variant_keeps_the_attention_kind(name, kind):
    cfg = lucidlm.from_preset(name, tiny=True)
    got = "MHA" if cfg.n_kv_heads == cfg.n_heads else "MQA" if cfg.n_kv_heads == 1 else "GQA"
    assert got == kind


def test_building_a_model_does_not_mutate_its_config():
    cfg = lucidlm.from_preset("llama-125m", tiny=True, rope_scaling=dict(type="linear", factor=2.0))
    before = cfg.to_dict()
    lucidlm.Transformer(cfg)
    assert cfg.to_dict() == before
