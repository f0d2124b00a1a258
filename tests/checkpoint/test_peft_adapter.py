"""PEFT format: an adapter saved by lucidlm loads with peft onto the transformers model (same logits),
and a PEFT-made adapter loads into lucidlm (same logits)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from hf_parity import hf_checkpoint, random_ids

import lucidlm
from lucidlm.checkpoint import CheckpointError
from lucidlm.checkpoint.peft_adapter import save_adapter
from lucidlm.model.lora import LoRAConfig, apply_lora, lora_layers

ATOL = 1e-4


@pytest.mark.parametrize("kind, layers", [("llama", None), ("qwen3", [1])])
def test_lucidlm_adapter_loads_in_peft(tmp_path, kind, layers):
    hf, loaded = hf_checkpoint(kind, tmp_path / "base")
    model = apply_lora(loaded.model, LoRAConfig(r=4, alpha=8, dropout=0.0, layers=layers))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.3)
    save_adapter(model, loaded.family, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids)
        base = hf.eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_peft_adapter_loads_in_lucidlm(tmp_path):
    hf, _ = hf_checkpoint("llama", tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    wrapped = peft.get_peft_model(hf, config)
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


def test_mismatched_adapter_is_refused_before_the_model_changes(tmp_path):
    _, loaded = hf_checkpoint("llama", tmp_path / "base")
    model = apply_lora(loaded.model, LoRAConfig(r=4, dropout=0.0))
    save_adapter(model, loaded.family, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    from lucidlm.checkpoint.loader import load_model
    from lucidlm.checkpoint.peft_adapter import load_adapter

    fresh = load_model(tmp_path / "base")
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \[4, .*needs \[8, "):
        load_adapter(fresh.model, fresh.family, tmp_path / "adapter")
    assert not list(lora_layers(fresh.model))
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(fresh.model, fresh.family, tmp_path)
