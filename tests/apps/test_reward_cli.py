"""`lucidlm reward train` then `lucidlm reward eval`, as a user runs them: a LoRA reward model directory out, its
pairwise accuracy with a bootstrap interval printed, and a base model it was not trained on refused."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from lucidlm.apps.cli import app
from lucidlm.checkpoint import FAMILIES, save_model
from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.tokenizer import byte_tokenizer

runner = CliRunner()


def _checkpoint(path, seed: int = 0):
    tok = byte_tokenizer()
    model = Transformer(from_preset("llama-125m", tiny=True, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.init_weights(torch.Generator().manual_seed(seed))
    save_model(model, path, FAMILIES["llama"])
    tok.save(path)
    return path


def _pairs(path, n: int, offset: int = 0):
    rows = [{"prompt": f"Where does person {i + offset} live?", "chosen": f"In town {i % 7}.",
             "rejected": "No idea!", "margin": 0.5} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_reward_train_then_eval(tmp_path):
    base = _checkpoint(tmp_path / "base")
    train, test = _pairs(tmp_path / "train.jsonl", 32), _pairs(tmp_path / "test.jsonl", 16, offset=100)
    result = runner.invoke(app, ["reward", "train", "--model", str(base), "--data", str(train),
                                 "--batch-size", "8", "--train.max-steps", "8", "--train.lr", "3e-2",
                                 "--train.warmup-steps", "1", "--train.out-dir", str(tmp_path / "run"),
                                 "--out", str(tmp_path / "rm")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {"reward_config.json", "reward_head.safetensors"}
    result = runner.invoke(app, ["reward", "eval", "--reward", str(tmp_path / "rm"), "--data", str(test), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pairs"] == 16 and report["accuracy"] >= 0.9 and report["lo"] <= report["accuracy"] <= report["hi"]
    other = _checkpoint(tmp_path / "other", seed=1)
    result = runner.invoke(app, ["reward", "eval", "--reward", str(tmp_path / "rm"), "--data", str(test),
                                 "--model", str(other)])
    assert result.exit_code != 0 and "another base model" in str(result.exception)


def test_reward_train_with_lora_writes_the_adapter_that_eval_applies(tmp_path):
    base = _checkpoint(tmp_path / "base")
    train = _pairs(tmp_path / "train.jsonl", 4)
    result = runner.invoke(app, ["reward", "train", "--model", str(base), "--data", str(train), "--lora",
                                 "--lora.r", "2", "--lora.targets", "v_proj", "--batch-size", "4",
                                 "--train.max-steps", "2", "--train.warmup-steps", "1",
                                 "--train.out-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rm = tmp_path / "run" / "reward"  # the default --out
    assert json.loads((rm / "reward_config.json").read_text())["has_adapter"] is True
    assert json.loads((rm / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]
    result = runner.invoke(app, ["reward", "eval", "--reward", str(rm), "--data", str(train)])
    assert result.exit_code == 0 and "on 4 pairs" in result.output, result.output
