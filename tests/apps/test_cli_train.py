"""`lucidlm corpus` and `lucidlm pretrain` as a user runs them: a config file, overrides, a loadable model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.checkpoint import load_model
from lucidlm.train.metrics import read_metrics

runner = CliRunner()


def test_corpus_then_pretrain_from_a_config_file_with_overrides(tmp_path):
    result = runner.invoke(app, ["corpus", str(tmp_path / "town"), "--documents", "600", "--files", "2"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "run.toml"
    config.write_text(f'data = ["{tmp_path / "town"}"]\nblock_size = 64\nbatch_size = 4\n'
                      '[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nffn_dim = 128\n'
                      f'[train]\nmax_steps = 100\nlr = 0.003\nwarmup_steps = 2\nout_dir = "{tmp_path / "run"}"\n')
    printed = runner.invoke(app, ["pretrain", "--config", str(config), "--train.max-steps", "12", "--print-config"])
    assert printed.exit_code == 0, printed.output
    resolved = json.loads(printed.stdout)
    assert resolved["train"]["max_steps"] == 12 and resolved["train"]["lr"] == 0.003 and resolved["model"]["dim"] == 64
    result = runner.invoke(app, ["pretrain", "--config", str(config), "--train.max-steps", "12",
                                 "--train.eval-every", "6", "--train.save-every", "6"])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["step"] == 12 and "val_loss" in last
    lm = lucidlm.load(tmp_path / "run" / "model")
    assert lm.config.dim == 64 and lm.generate("Anna", max_new_tokens=3)[0].token_ids
    assert (tmp_path / "run" / "loss_curve.png").exists()


def test_pretrain_errors_name_the_problem(tmp_path):
    result = runner.invoke(app, ["pretrain", "--train.max-steps", "x"])
    assert result.exit_code != 0 and "train.max_steps" in str(result.exception)
    result = runner.invoke(app, ["pretrain", "--train.out-dir", str(tmp_path / "r")])
    assert "no training data" in str(result.exception)


def test_tokenizer_train_then_pretrain_with_it(tmp_path):
    assert runner.invoke(app, ["corpus", str(tmp_path / "town"), "--documents", "400", "--files", "2"]).exit_code == 0
    result = runner.invoke(app, ["tokenizer", "train", "--data", str(tmp_path / "town"), "--vocab-size", "400",
                                 "--out", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "town"), "--tokenizer", str(tmp_path / "tok"),
                                 "--model.dim", "64", "--model.n-layers", "1", "--model.n-heads", "4",
                                 "--model.n-kv-heads", "2", "--model.ffn-dim", "128", "--block-size", "32",
                                 "--batch-size", "2", "--train.max-steps", "3", "--train.out-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lm = lucidlm.load(tmp_path / "r" / "model")
    assert lm.tokenizer.vocab_size == lm.config.vocab_size <= 400 and lm.tokenizer.chat_template


def _chat_rows(n):
    people = ["Anna", "Ben", "Clara", "David"]
    return [{"messages": [{"role": "user", "content": f"Who is number {i % 4}?"},
                          {"role": "assistant", "content": f"{people[i % 4]}."}]} for i in range(n)]


def test_sft_with_lora_writes_a_peft_adapter_and_dpo_widens_the_margin(tmp_path):
    from lucidlm.random_checkpoint import build_random_checkpoint

    base = build_random_checkpoint(tmp_path / "base")  # carries a chat template
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in _chat_rows(16)) + "\n")
    common = ["--train.max-steps", "6", "--train.lr", "0.01", "--train.warmup-steps", "1", "--batch-size", "4",
              "--max-len", "64"]
    result = runner.invoke(app, ["sft", "--model", str(base), "--data", str(tmp_path / "chat.jsonl"), "--lora",
                                 "--lora.r", "4", "--lora.targets", "q_proj,v_proj", "--out", str(tmp_path / "adapter"),
                                 "--train.out-dir", str(tmp_path / "sft")] + common)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    plain, adapted = lucidlm.load(base), lucidlm.load(base, adapter=tmp_path / "adapter")
    ids = torch.tensor([plain.encode("Who is number 2?")])
    assert not torch.allclose(plain.model(ids), adapted.model(ids))
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl")]
    assert losses[-1] < losses[0]

    pairs = [{"prompt": "Who bakes?", "chosen": "Anna.", "rejected": "Nobody."}] * 8
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    result = runner.invoke(app, ["dpo", "--model", str(base), "--data", str(tmp_path / "pairs.jsonl"), "--lora",
                                 "--beta", "0.5", "--train.out-dir", str(tmp_path / "dpo")] + common)
    assert result.exit_code == 0, result.output
    margins = [r["margin"] for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl")]
    assert margins[0] == pytest.approx(0.0, abs=1e-4) and margins[-1] > margins[0]
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").exists()


def test_full_sft_exports_a_model(tmp_path):
    from lucidlm.random_checkpoint import build_random_checkpoint

    base = build_random_checkpoint(tmp_path / "base")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in _chat_rows(8)) + "\n")
    result = runner.invoke(app, ["sft", "--model", str(base), "--data", str(tmp_path / "chat.jsonl"),
                                 "--train.max-steps", "2", "--train.out-dir", str(tmp_path / "run"), "--prefix-lm"])
    assert result.exit_code == 0, result.output
    lm = lucidlm.load(tmp_path / "run" / "model")
    assert lm.tokenizer.chat_template and lm.config.dim == 256


def _town(path, documents=120):
    path.mkdir()
    (path / "a.txt").write_text("\n\n".join(f"Anna the baker sells bread to Ben on day {i}." for i in range(documents)))
    return path


def test_pretrain_mlm_trains_an_encoder_whose_loss_falls_and_exports_a_bert(tmp_path):
    from transformers import BertForMaskedLM

    town = _town(tmp_path / "town")
    args = ["pretrain", "--objective", "mlm", "--data", str(town), "--model.preset", "bert-base", "--model.dim", "32",
            "--model.n-layers", "1", "--model.n-heads", "2", "--model.ffn-dim", "64", "--model.max-seq-len", "32",
            "--block-size", "32", "--batch-size", "8", "--val-percent", "0", "--train.lr", "0.005",
            "--train.warmup-steps", "2", "--train.save-every", "8", "--train.out-dir", str(tmp_path / "run")]
    result = runner.invoke(app, args + ["--train.max-steps", "16"])
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    enc = lucidlm.load_encoder(tmp_path / "run" / "model", device="cpu")
    assert enc.tokenizer.mask_token_id == 259 and enc.config.d_model == 32
    ids = torch.tensor([enc.encode("Anna the [MASK] sells bread.")])
    theirs = BertForMaskedLM.from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.model(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
    resumed = runner.invoke(app, args + ["--train.max-steps", "18"])  # from the bert-layout checkpoint of step 16
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")][-3:] == [16, 17, 18]


def test_pretrain_objective_and_model_must_match(tmp_path):
    town = _town(tmp_path / "town", 4)
    out = ["--train.out-dir", str(tmp_path / "r")]
    result = runner.invoke(app, ["pretrain", "--objective", "mlm", "--data", str(town)] + out)
    assert "--objective mlm trains an encoder-only masked LM, but --model.preset llama-125m is a causal LM" in str(
        result.exception)
    result = runner.invoke(app, ["pretrain", "--data", str(town), "--model.preset", "bert-base"] + out)
    assert "--model.preset bert-base is an encoder-only masked LM" in str(result.exception)
    assert "--objective mlm" in str(result.exception)
    result = runner.invoke(app, ["pretrain", "--objective", "span", "--data", str(town)] + out)
    assert "objective must be one of ['causal', 'mlm']" in str(result.exception)
    result = runner.invoke(app, ["tokenizer", "train", "--data", str(town), "--vocab-size", "300",
                                 "--out", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pretrain", "--objective", "mlm", "--data", str(town), "--model.preset", "bert-base",
                                 "--tokenizer", str(tmp_path / "tok")] + out)
    assert "the tokenizer has no mask token" in str(result.exception)
    assert "lucidlm tokenizer train --mlm" in str(result.exception)


def test_sft_with_a_bottleneck_adapter_writes_it_and_load_applies_it(tmp_path):
    from lucidlm.random_checkpoint import build_random_checkpoint

    base = build_random_checkpoint(tmp_path / "base")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in _chat_rows(16)) + "\n")
    args = ["sft", "--model", str(base), "--data", str(tmp_path / "chat.jsonl"), "--train.max-steps", "4",
            "--train.lr", "0.01", "--train.warmup-steps", "1", "--batch-size", "2", "--max-len", "64",
            "--train.save-every", "4"]
    result = runner.invoke(app, args + ["--adapter", "bottleneck", "--bottleneck.size", "8",
                                        "--train.out-dir", str(tmp_path / "sft")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "sft" / "adapter" / "bottleneck_adapter_config.json").read_text())
    assert config["size"] == 8 and config["places"] == ["attn", "mlp"]
    adapted = lucidlm.load(base, adapter=tmp_path / "sft" / "adapter", compile="off")
    ids = torch.tensor([adapted.encode("Who is number 2?")])
    with torch.no_grad():
        assert not torch.allclose(load_model(base).model(ids), adapted.model(ids))
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    for extra, message in ((["--adapter", "houlsby"], r"unknown adapter 'houlsby'; choose from \['lora', "),
                           (["--adapter", "lora", "--bottleneck"], "one adapter at a time")):
        result = runner.invoke(app, args + extra + ["--train.out-dir", str(tmp_path / "bad")])
        assert result.exit_code != 0 and message.replace("\\", "") in str(result.exception) or \
            pytest.fail(str(result.exception))
