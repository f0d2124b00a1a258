"""LoRA: starts as the base model, merge == unmerged, disabled == base, only A and B train, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.model.lora import LoRAConfig, LoRALinear, apply_lora, disabled, lora_layers, merge_lora, unmerge_lora

IDS = torch.tensor([[3, 9, 4, 1, 7, 2, 8]])


def randomize(model):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.2)


def test_starts_as_base_and_only_adapters_train():
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(list(lora_layers(model))) == model.config.n_layers * 7
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for _, m in lora_layers(model))
    assert lora == expected


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_model()
    base_weights = {n: p.clone() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(r=4, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize(model)
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name + ".weight"], rtol=0, atol=1e-6)


def test_disabled_runs_the_base_model_and_update_is_the_formula():
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoRAConfig(r=2, alpha=6, dropout=0.0, use_rslora=True))
    randomize(model)
    with torch.no_grad(), disabled(model):
        torch.testing.assert_close(model(IDS), base)
    layer: LoRALinear = model.blocks[0].attn.q_proj
    x = torch.randn(3, layer.base_layer.in_features)
    scaling = 6 / 2**0.5
    expected = x @ layer.base_layer.weight.T + scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_layer_subset_and_dropout_only_in_training():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=2, dropout=0.5, layers=[1]))
    assert {n.split(".")[1] for n, _ in lora_layers(model)} == {"1"}
    randomize(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDS), model(IDS))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(IDS), model(IDS))


@pytest.mark.parametrize("config, message", [
    (LoRAConfig(r=0), "rank r must be an integer >= 1"),
    (LoRAConfig(target_modules=("qkv",)), r"unknown LoRA target modules \['qkv'\]"),
    (LoRAConfig(layers=[5]), r"layers \[5\] out of range for a model of 2 blocks"),
    (LoRAConfig(dropout=1.0), "dropout must be in"),
])
def test_bad_config_fails_before_the_model_changes(config, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)
    assert not list(lora_layers(model)) and all(p.requires_grad for p in model.parameters())
