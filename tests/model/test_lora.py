"""LoRA: starts as the base model, merge == unmerged, disabled == base, only A and B train, bad input;
one layer against PEFT's own LoRA layer (same init from the same seed, same output, same merge)."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_lm import tiny_model
from torch import nn

from lucidlm.model.cpu_kernels import is_packed, pack_linears
from lucidlm.model.linear import Linear
from lucidlm.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    disabled,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)

IDS = torch.tensor([[3, 9, 4, 1, 7, 2, 8]])


def randomize(model):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.2)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_one_layer_matches_peft(use_rslora):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(24, 40)

    net = Net()
    base = Linear(24, 40)
    base.load_state_dict(net.q_proj.state_dict())
    torch.manual_seed(7)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"],
                                                 use_rslora=use_rslora), net)
    torch.manual_seed(7)
    ours = LoRALinear(base, 4, 6, use_rslora=use_rslora)
    theirs = net.q_proj
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)  # Kaiming-uniform A, same draws
    assert not ours.lora_B.weight.any() and ours.scaling == theirs.scaling["default"]
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.5)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
        x = torch.randn(2, 5, 24)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
        ours.merge()
        theirs.merge()
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=0, atol=1e-6)


def test_starts_as_base_and_only_adapters_train():
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base)  # B = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert len(list(lora_layers(model))) == model.config.n_layers * 7
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for _, m in lora_layers(model))
    assert sum(p.numel() for p in trainable) == expected
    state = lora_state_dict(model)
    assert len(state) == 2 * model.config.n_layers * 7
    assert state["blocks.1.mlp.down_proj.lora_B.weight"].shape == (model.config.dim, 4)


def test_gradients_reach_only_a_and_b():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=2, dropout=0.0, target_modules=("v_proj",)))
    randomize(model)
    model.train()
    model(IDS).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


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


def test_disabled_on_a_merged_model_is_the_base_then_merged_again():
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoRAConfig(r=4, dropout=0.0))
    randomize(model)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        with disabled(model):
            torch.testing.assert_close(model(IDS), base, rtol=1e-4, atol=1e-4)
        assert all(m.merged for _, m in lora_layers(model))
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-1


def test_packed_base_weights():
    """oneDNN-packed base layers: same output, and a merge re-packs the merged weight (no stale copy)."""
    assert torch.backends.mkldnn.is_available()  # every CPU build of torch ships oneDNN
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, dropout=0.0))
    randomize(model)
    with torch.no_grad():
        plain = model(IDS)
        pack_linears(model)
        assert all(is_packed(m.base_layer.weight) for _, m in lora_layers(model))
        torch.testing.assert_close(model(IDS), plain, rtol=1e-5, atol=1e-5)
        merge_lora(model)
        assert all(is_packed(m.base_layer.weight) for _, m in lora_layers(model))
        torch.testing.assert_close(model(IDS), plain, rtol=1e-4, atol=1e-4)


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


def test_targets_by_path_tail_as_peft_matches():
    model = apply_lora(tiny_model(), LoRAConfig(r=2, target_modules=("blocks.1.attn.q_proj", "mlp.up_proj")))
    assert {n for n, _ in lora_layers(model)} == {"blocks.1.attn.q_proj", "blocks.0.mlp.up_proj",
                                                  "blocks.1.mlp.up_proj"}


@pytest.mark.parametrize("config, message", [
    (LoRAConfig(target_modules=("attn.qkv",)), r"unknown LoRA target modules \['attn.qkv'\]"),
    (LoRAConfig(target_modules=("blocks.7.attn.q_proj",)), "no Linear layer named"),
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


def test_a_second_adapter_is_refused():
    model = apply_lora(tiny_model(), LoRAConfig(r=2, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="already carries LoRA layers"):
        apply_lora(model, LoRAConfig(r=2, target_modules=("k_proj",)))
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} == {"q_proj"}


def test_merge_and_unload_keeps_the_adapted_output_with_plain_layers():
    from lucidlm.model.lora import merge_and_unload

    model = apply_lora(tiny_model(), LoRAConfig(r=2, alpha=4)).eval()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.3)
        adapted = model(IDS)
        merge_and_unload(model)
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-4, atol=1e-4)
    assert not hasattr(model, "lora_config") and not list(lora_layers(model))
