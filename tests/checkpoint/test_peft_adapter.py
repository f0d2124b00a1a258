"""PEFT format: an adapter saved by lucidlm loads with peft onto the transformers model (same logits),
and a PEFT-made adapter loads into lucidlm (same logits); bad adapters are refused by file and key."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from hf_parity import hf_checkpoint, random_ids
from safetensors.torch import load_file, save_file
from tiny_lm import tiny_model

import lucidlm
from lucidlm.checkpoint import CheckpointError, load_model, save_model
from lucidlm.checkpoint.peft_adapter import fill_adapter, load_adapter, save_adapter
from lucidlm.model.lora import TARGETS, LoRAConfig, apply_lora, lora_layers

ATOL = 1e-4
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def randomize_b(model, std: float = 0.3) -> None:
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, std)


@pytest.mark.parametrize("kind, config", [
    ("llama", LoRAConfig(r=4, alpha=8, dropout=0.0)),
    ("mistral", LoRAConfig(r=2, alpha=4, dropout=0.1, target_modules=("q_proj", "down_proj"))),
    ("qwen2", LoRAConfig(r=4, alpha=6, dropout=0.0, use_rslora=True)),
    ("qwen3", LoRAConfig(r=4, alpha=8, dropout=0.0, layers=[1])),
    ("gemma", LoRAConfig(r=3, alpha=8, dropout=0.0)),
    ("mixtral", LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=ATTENTION)),  # experts: see below
    ("qwen3_moe", LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=ATTENTION, layers=[0])),
])
def test_lucidlm_adapter_loads_in_peft(tmp_path, kind, config):
    hf, loaded = hf_checkpoint(kind, tmp_path / "base")
    model = apply_lora(loaded.model, config).eval()
    randomize_b(model)
    save_adapter(model, loaded.family, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["layers_to_transform"] == config.layers
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids)
        base = hf.eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_saved_keys_are_peft_names(tmp_path):
    _, loaded = hf_checkpoint("llama", tmp_path / "base")
    model = apply_lora(loaded.model, LoRAConfig(r=2, target_modules=("q_proj", "down_proj"), layers=[1]))
    save_adapter(model, loaded.family, tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.model.layers.1.{m}.lora_{ab}.weight"
                    for m in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB"}
    assert not list(tmp_path.glob("adapter/.*.tmp"))  # atomic writes leave no temporary file


@pytest.mark.parametrize("kind, options", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"])),
    ("qwen3", dict(target_modules=list(TARGETS), layers_to_transform=[1], layers_pattern="layers", use_rslora=True)),
    ("gemma", dict(target_modules="all-linear")),
    ("mistral", dict(target_modules=["o_proj", "down_proj"], layers_to_transform=[0])),
])
def test_peft_adapter_loads_in_lucidlm(tmp_path, kind, options):
    hf, _ = hf_checkpoint(kind, tmp_path / "base")
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, **options))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    wrapped.save_pretrained(tmp_path / "adapter")
    ids = random_ids()
    with torch.no_grad():
        theirs = wrapped.eval()(ids).logits
        lm = lucidlm.load(tmp_path / "base", adapter=tmp_path / "adapter", device="cpu")
        torch.testing.assert_close(lm.model(ids), theirs, rtol=0, atol=ATOL)
    layers = options.get("layers_to_transform")
    assert {int(n.split(".")[1]) for n, _ in lora_layers(lm.model)} == set(layers or range(lm.config.n_layers))
    save_adapter(lm.model, lm.family, tmp_path / "again")  # saved back: the same tensors under the same names
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "again"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config, again = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("adapter", "again"))
    assert set(config["target_modules"]) == set(again["target_modules"])
    assert config["layers_to_transform"] == again["layers_to_transform"]


def test_lucidlm_layout_round_trip_and_resume(tmp_path):
    """lucidlm's own checkpoint layout keeps our names; load_adapter and fill_adapter read them back."""
    save_model(tiny_model(), tmp_path / "base")
    loaded = load_model(tmp_path / "base")
    model = apply_lora(loaded.model, LoRAConfig(r=2, dropout=0.0, layers=[0]))
    randomize_b(model)
    save_adapter(model, loaded.family, tmp_path / "adapter")
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids)
        fresh = load_model(tmp_path / "base")
        torch.testing.assert_close(load_adapter(fresh.model, None, tmp_path / "adapter")(ids), expected)
        resumed = apply_lora(load_model(tmp_path / "base").model, LoRAConfig(r=2, dropout=0.0, layers=[0]))
        fill_adapter(resumed, loaded.family, tmp_path / "adapter")
        torch.testing.assert_close(resumed(ids), expected)


def test_mismatched_adapter_is_refused_before_the_model_changes(tmp_path):
    _, loaded = hf_checkpoint("llama", tmp_path / "base")
    model = apply_lora(loaded.model, LoRAConfig(r=4, dropout=0.0))
    adapter = tmp_path / "adapter"
    save_adapter(model, loaded.family, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    fresh = load_model(tmp_path / "base")

    def refused(config: dict, message: str) -> None:
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            load_adapter(fresh.model, fresh.family, adapter)
        assert not list(lora_layers(fresh.model))

    refused({**cfg, "r": 8}, r"lora_A.weight has shape \[4, .*needs \[8, ")
    refused({**cfg, "alpha_pattern": {"q_proj": 4}}, r"adapter_config.json: alpha_pattern=.* is not supported")
    refused({**cfg, "target_modules": ["q_proj", "embed_tokens"]},
            r"adapter_config.json: unknown LoRA target modules \['embed_tokens'\]")
    refused({**cfg, "layers_to_transform": [2]}, r"adapter_config.json: LoRA layers \[2\] out of range")
    refused({**cfg, "use_dora": True}, "use_dora=True is not supported")
    refused({**cfg, "init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changed the base")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(adapter / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: .*missing \['base_model.model.model"
                                              r".layers.1.mlp.up_proj.lora_B.weight'\]"):
        load_adapter(fresh.model, fresh.family, adapter)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(fresh.model, fresh.family, tmp_path)
    assert not list(lora_layers(fresh.model))


def test_unsupported_model_types_and_moe_experts_are_named(tmp_path):
    _, gpt2 = hf_checkpoint("gpt2", tmp_path / "gpt2")
    model = apply_lora(gpt2.model, LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    with pytest.raises(CheckpointError, match=r"not supported yet for model type 'gpt2'; supported: \['llama'"):
        save_adapter(model, gpt2.family, tmp_path / "adapter")
    _, mixtral = hf_checkpoint("mixtral", tmp_path / "mixtral")
    model = apply_lora(mixtral.model, LoRAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(CheckpointError, match=r"mixtral: blocks\.0\.mlp\.experts\.0\.\w+_proj is a MoE expert"):
        save_adapter(model, mixtral.family, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
