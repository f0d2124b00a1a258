"""Bottleneck adapters on disk: save -> lucidlm.load(adapter=...) gives the same logits (with and without trained
norms), resume fills the same tensors, and bad adapter directories are refused by file and key before the model
changes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lucidlm
from lucidlm.checkpoint import CheckpointError, load_model
from lucidlm.checkpoint.bottleneck_adapter import (
    fill_bottleneck_adapter,
    load_bottleneck_adapter,
    save_bottleneck_adapter,
)
from lucidlm.model.bottleneck_adapter import BottleneckConfig, adapters, apply_bottleneck
from lucidlm.model.norm import norm_parameters
from lucidlm.random_checkpoint import build_random_checkpoint

IDS = torch.tensor([[3, 9, 4, 1, 7, 2, 8, 200]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("bottleneck") / "base")


def trained(model, config: BottleneckConfig):
    apply_bottleneck(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("config", [BottleneckConfig(size=8), BottleneckConfig(size=4, activation="silu",
                                                                               places=("mlp",), layers=[1, 3],
                                                                               train_norms=True)])
def test_save_then_load_gives_the_same_logits(tmp_path, base, config):
    model = trained(load_model(base).model, config)
    save_bottleneck_adapter(model, tmp_path / "adapter", base_model=str(base))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["bottleneck_adapter.safetensors",
                                                                       "bottleneck_adapter_config.json"]
    saved = load_file(tmp_path / "adapter" / "bottleneck_adapter.safetensors")
    assert any(k.endswith("norm.weight") for k in saved) == config.train_norms
    with torch.no_grad():
        expected = model(IDS)
        plain = lucidlm.load(base, device="cpu")
        lm = lucidlm.load(base, adapter=tmp_path / "adapter", device="cpu")
        assert (plain.model(IDS) - expected).abs().max() > 1e-2  # the adapter (and norms) change the output
        assert torch.equal(lm.model(IDS), expected)
    assert lm.model.bottleneck_config == config
    resumed = apply_bottleneck(load_model(base).model, config).eval()
    fill_bottleneck_adapter(resumed, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(resumed(IDS), expected)


def test_bad_adapter_directories_are_refused_before_the_model_changes(tmp_path, base):
    adapter = tmp_path / "adapter"
    save_bottleneck_adapter(trained(load_model(base).model, BottleneckConfig(size=4, train_norms=True)), adapter)
    cfg = json.loads((adapter / "bottleneck_adapter_config.json").read_text())
    tensors = load_file(adapter / "bottleneck_adapter.safetensors")
    fresh = load_model(base).model
    before = {n: p.clone() for n, p in norm_parameters(fresh).items()}

    def refused(message: str, config: dict | None = None, weights: dict | None = None) -> None:
        (adapter / "bottleneck_adapter_config.json").write_text(json.dumps(config or cfg))
        save_file(weights or tensors, adapter / "bottleneck_adapter.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_bottleneck_adapter(fresh, adapter)
        assert not list(adapters(fresh)) and getattr(fresh, "bottleneck_config", None) is None
        assert all(torch.equal(p, before[n]) for n, p in norm_parameters(fresh).items())

    refused(r"format 'peft' version 1; only 'lucidlm-bottleneck-adapter' version 1", {**cfg, "format": "peft"})
    refused(r"unknown keys \['scaling'\]", {**cfg, "scaling": 2.0})
    refused("made for hidden size 64, the model's is 256", {**cfg, "hidden_size": 64})
    refused(r"bottleneck_adapter_config.json: bottleneck adapter layers \[9\] out of range for a model of 4",
            {**cfg, "layers": [9]})
    refused(r"activation 'swish' unknown", {**cfg, "activation": "swish"})
    refused(r"places=.* must be a list of names", {**cfg, "places": "attn"})
    refused(r"blocks.0.attn_adapter.down.weight has shape \[4, 256\], the model needs \[8, 256\]", {**cfg, "size": 8})
    refused(r"missing \['blocks.1.mlp_adapter.up.bias'\]",
            weights={k: v for k, v in tensors.items() if k != "blocks.1.mlp_adapter.up.bias"})
    refused(r"unexpected \['lm_head.weight'\]", weights={**tensors, "lm_head.weight": torch.zeros(2, 2)})
    refused(r"tensor 'norm.weight' has dtype I32",
            weights={**tensors, "norm.weight": torch.zeros(256, dtype=torch.int32)})
    (adapter / "bottleneck_adapter_config.json").write_text(json.dumps(cfg))
    outside = tmp_path / "outside.safetensors"
    save_file(tensors, outside)
    (adapter / "bottleneck_adapter.safetensors").unlink()
    (adapter / "bottleneck_adapter.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_bottleneck_adapter(fresh, adapter)
    (adapter / "bottleneck_adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no bottleneck_adapter.safetensors"):
        load_bottleneck_adapter(fresh, adapter)
    with pytest.raises(CheckpointError, match="no adapter_config.json .* nor bottleneck_adapter_config.json"):
        lucidlm.load(base, adapter=tmp_path, device="cpu")
    assert not list(adapters(fresh))
