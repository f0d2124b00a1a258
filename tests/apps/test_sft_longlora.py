"""`lucidlm sft --lora --lora.train-embeddings-norms --s2-attn-group N`: LongLoRA as a user runs it. The first step's
loss is the base model's under S2-Attn (not under full attention), and the adapter carries the embedding and norms."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.checkpoint import load_model
from lucidlm.model.shifted_sparse_attention import set_s2_attn_group
from lucidlm.tokenizer import Tokenizer
from lucidlm.train.metrics import read_metrics
from lucidlm.train.objectives import CausalLM
from lucidlm.train.sft_data import SFTDataset

runner = CliRunner()


def first_batch_loss(base, data, group):
    model = load_model(base).model.train()
    set_s2_attn_group(model, group)
    batch = next(iter(SFTDataset([data], Tokenizer.from_dir(base), 96, 4, pad_multiple=16)))
    assert batch["input_ids"].shape[1] % 16 == 0  # padded to whole groups
    with torch.no_grad():
        parts = CausalLM()(model, batch)
    return float(parts.loss_sum) / parts.tokens


def test_sft_with_longlora_trains_embeddings_and_norms_under_s2_attn(tmp_path):
    from lucidlm.random_checkpoint import build_random_checkpoint

    base = build_random_checkpoint(tmp_path / "base")
    people = ["Anna", "Ben", "Clara", "David"]
    rows = [{"messages": [{"role": "user", "content": f"Who is number {i % 4}?"},
                          {"role": "assistant", "content": f"{people[i % 4]}."}]} for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["sft", "--model", str(base), "--data", str(data), "--train.max-steps", "2", "--train.lr", "0.01",
            "--train.warmup-steps", "1", "--batch-size", "4", "--max-len", "96", "--s2-attn-group", "16"]
    lora = ["--lora", "--lora.r", "4", "--lora.dropout", "0", "--lora.train-embeddings-norms"]
    result = runner.invoke(app, args + lora + ["--train.out-dir", str(tmp_path / "sft")])
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "loss" in r]
    grouped, full = first_batch_loss(base, data, 16), first_batch_loss(base, data, None)
    assert losses[0] == pytest.approx(grouped, abs=1e-5) and abs(grouped - full) > 1e-4
    config = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "model.norm", "model.layers.3.input_layernorm"} <= set(config["modules_to_save"])
    plain, adapted = load_model(base).model, lucidlm.load(base, adapter=tmp_path / "sft" / "adapter", compile="off")
    assert not torch.equal(plain.embed.weight, adapted.model.embed.weight)
    assert not torch.equal(plain.blocks[0].attn_norm.weight, adapted.model.blocks[0].attn_norm.weight)
    result = runner.invoke(app, args + ["--s2-attn-group", "7", "--train.out-dir", str(tmp_path / "bad")])
    assert "s2_attn_group must be an even integer >= 2" in str(result.exception) and "got 7" in str(result.exception)
    result = runner.invoke(app, ["dpo", "--model", str(base), "--data", str(data), "--s2-attn-group", "16"])
    assert "--s2-attn-group is an sft option" in str(result.exception)
