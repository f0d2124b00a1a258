"""LongLoRA's trainable embedding and norms as PEFT's modules_to_save: saved whole in the adapter, read back by
lucidlm (fresh model, resume) and by PEFT onto the transformers model, with the same logits."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from hf_parity import hf_checkpoint, random_ids
from safetensors.torch import load_file

import lucidlm
from lucidlm.checkpoint import CheckpointError, load_model
from lucidlm.checkpoint.peft_adapter import fill_adapter, load_adapter, save_adapter
from lucidlm.model.lora import LoRAConfig, apply_lora, disabled, longlora_modules, lora_layers

ATOL = 1e-4


def trained(model, config: LoRAConfig):
    """``model`` with LoRA and its modules_to_save moved away from the base (as training would)."""
    apply_lora(model, config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.3, generator=g)
        for p in model.parameters():
            if p.requires_grad and p.dim() == 1:  # the norms
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        model.embed.weight.add_(torch.randn(model.embed.weight.shape, generator=g) * 0.1)
    return model


def test_embedding_and_norms_train_and_round_trip_through_peft(tmp_path):
    hf, loaded = hf_checkpoint("llama", tmp_path / "base")
    config = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"),
                        modules_to_save=longlora_modules(loaded.model))
    model = apply_lora(loaded.model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} | {
        "embed.weight", "norm.weight", *(f"blocks.{i}.{m}.weight" for i in (0, 1) for m in ("attn_norm", "mlp_norm"))}
    with pytest.raises(ValueError, match="modules_to_save in place"):
        with disabled(model):
            pass
    model = trained(load_model(tmp_path / "base").model, config)
    save_adapter(model, loaded.family, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == sorted(["model.embed_tokens", "model.norm"] + [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("input_layernorm", "post_attention_layernorm")])
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.model.layers.1.input_layernorm.weight"} \
        <= keys
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids)
        assert (ours - hf(ids).logits).abs().max() > 1e-2
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)  # PEFT reads our adapter
        fresh = lucidlm.load(tmp_path / "base", adapter=tmp_path / "adapter", device="cpu", compile="off")
        torch.testing.assert_close(fresh.model(ids), ours, rtol=0, atol=ATOL)
        resumed = apply_lora(load_model(tmp_path / "base").model, config)
        fill_adapter(resumed, loaded.family, tmp_path / "adapter")
        torch.testing.assert_close(resumed.eval()(ids), ours, rtol=0, atol=ATOL)


def test_a_peft_adapter_with_short_modules_to_save_loads_in_lucidlm(tmp_path):
    hf, _ = hf_checkpoint("qwen3", tmp_path / "base")  # PEFT's "norm": every name ending so, q_norm / k_norm too
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["o_proj"],
                                                      modules_to_save=["embed_tokens", "norm"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape) * 0.3)
    wrapped.save_pretrained(tmp_path / "adapter")
    ids = random_ids()
    with torch.no_grad():
        theirs = wrapped.eval()(ids).logits
        lm = lucidlm.load(tmp_path / "base", adapter=tmp_path / "adapter", device="cpu", compile="off")
        torch.testing.assert_close(lm.model(ids), theirs, rtol=0, atol=ATOL)
    norms = {n for n, _ in lm.model.named_modules() if n.endswith("norm")}  # q_norm, k_norm, attn_norm, ... norm
    assert "blocks.1.attn.q_norm" in norms and set(lm.model.lora_config.modules_to_save) == {"embed", *norms}


def test_modules_to_save_that_cannot_be_expressed_are_refused(tmp_path):
    _, loaded = hf_checkpoint("llama", tmp_path / "base")
    save_adapter(apply_lora(loaded.model, LoRAConfig(r=2, modules_to_save=("norm",))), loaded.family,
                 tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    fresh = load_model(tmp_path / "base")
    for entry in (["score"], "norm"):
        path.write_text(json.dumps({**config, "modules_to_save": entry}))
        with pytest.raises(CheckpointError, match=r"modules_to_save"):
            load_adapter(fresh.model, fresh.family, tmp_path / "adapter")
        assert not list(lora_layers(fresh.model))
    _, tied = hf_checkpoint("llama", tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties its embedding to lm_head"):
        apply_lora(tied.model, LoRAConfig(r=2, modules_to_save=longlora_modules(tied.model)))
    with pytest.raises(ValueError, match="'q_proj' names no embedding, norm or lm_head"):
        apply_lora(tied.model, LoRAConfig(r=2, modules_to_save=("q_proj",)))
