"""``lucidlm merge``: a PEFT-made LoRA adapter folded into its base equals PEFT's own merge_and_unload
(transformers loads the written checkpoint), and bad input is refused before anything is written."""

from __future__ import annotations

import peft
import torch
from hf_parity import hf_checkpoint, random_ids
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lucidlm.apps.cli import app
from lucidlm.checkpoint import CheckpointError, load_model
from lucidlm.model.lora import LoRALinear

runner = CliRunner()


def peft_adapter(hf, directory) -> peft.PeftModel:
    torch.manual_seed(0)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B starts at zero: give the adapter something to merge
    model.save_pretrained(directory)
    return model


def test_merged_checkpoint_equals_peft_merge_and_unload(tmp_path):
    hf, _ = hf_checkpoint("llama", tmp_path / "base")
    base_logits = hf.eval()(random_ids()).logits.detach()
    theirs = peft_adapter(hf, tmp_path / "adapter").merge_and_unload().eval()
    result = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)
        ours = load_model(tmp_path / "out").model  # an ordinary checkpoint again: no LoRA layer left
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-4)


def test_merge_refuses_a_directory_without_a_lora_adapter(tmp_path):
    hf_checkpoint("llama", tmp_path / "base")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "empty"), str(tmp_path / "out")])
    assert isinstance(result.exception, CheckpointError) and "adapter_config.json" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_to_overwrite_the_base(tmp_path):
    hf, _ = hf_checkpoint("llama", tmp_path / "base")
    peft_adapter(hf, tmp_path / "adapter")
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "base")])
    assert isinstance(result.exception, ValueError) and "elsewhere" in str(result.exception)
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before
