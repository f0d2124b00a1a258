"""The trainer: the loss falls, accumulation is exact, spikes are skipped and rolled back, a SIGKILLed
run resumes to the same result, a different run's checkpoint is refused."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_data import FixedValData, ProgressionData
from waiting import HANG_GUARD, wait_for

from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.train.metrics import read_metrics
from lucidlm.train.optim import param_groups, warmup_cosine
from lucidlm.train.spike_guard import SpikeGuard, Verdict
from lucidlm.train.trainer import TrainConfig, Trainer

HERE = Path(__file__).parent


def tiny(seed: int = 0, **overrides) -> Transformer:
    model = Transformer(from_preset(overrides.pop("preset", "llama-125m"), tiny=True, vocab_size=64, **overrides))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), max_steps=30, lr=3e-3, warmup_steps=3, save_every=10,
                eval_every=10, progress=False)
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_metrics_and_curve_are_written(tmp_path):
    cfg = config(tmp_path, max_steps=60)
    Trainer(tiny(), cfg, ProgressionData(), FixedValData()).fit()
    records = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [10, 20, 30, 40, 50, 60]
    assert vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    png = Path(cfg.out_dir) / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_decay_only_on_matrices():
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert [f(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


class ListData:
    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield self.batches[(self.pos - 1) % len(self.batches)]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """A step over 2 micro-batches equals the step over their concatenation, even when the
    micro-batches hold different numbers of trained tokens (the mean is over the step's tokens)."""
    big = ProgressionData(batch=4).make(0)
    big["labels"][0, :10] = -100  # uneven token counts between the halves
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    grads = []
    runs = ((config(tmp_path / "a"), ListData([big])), (config(tmp_path / "b", grad_accum=2), ListData(halves)))
    for cfg, data in runs:
        trainer = Trainer(tiny(), cfg, data)
        trainer.optimizer.step = lambda t=trainer: grads.append([p.grad.clone() for p in t.model.parameters()])
        trainer._train_step()
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_spike_guard_verdicts():
    guard = SpikeGuard(factor=3.0, window=4, max_spikes=2, min_history=2)
    assert [guard.check(x) for x in (1.0, 1.1)] == [Verdict.OK, Verdict.OK]
    assert guard.check(10.0) is Verdict.SKIP  # 10 > 3 × 1.05
    assert guard.check(1.0) is Verdict.OK  # a spike, then back to normal: the count resets
    assert guard.check(float("nan")) is Verdict.SKIP
    assert guard.check(20.0) is Verdict.ROLLBACK


def test_spikes_are_skipped_and_repeated_ones_roll_back(tmp_path):
    cfg = config(tmp_path, max_steps=40, save_every=5, spike_factor=1.3, max_spikes=3, rollback_lr_factor=0.5)
    data = ProgressionData(spikes={25, 30, 31, 32})  # one lone spike, then three in a row
    model = tiny()
    Trainer(model, cfg, data).fit()
    records = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    skipped = [r for r in records if "skipped_loss" in r]
    assert [r["step"] for r in skipped] == [26, 31, 32, 33]
    assert "rollback_lr_scale" in skipped[-1] and skipped[-1]["rollback_lr_scale"] == 0.5
    after = [r for r in records if r["step"] > 33 and "lr" in r]
    base = cfg.lr * warmup_cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)(after[0]["step"] - 1)
    assert after[0]["lr"] == pytest.approx(0.5 * base)


def _run(out: Path, steps: int, pause: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    return subprocess.Popen([sys.executable, str(HERE / "resume_run.py"), str(out), str(steps), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = _run(tmp_path / "straight", 14)
    killed = _run(tmp_path / "killed", 14, pause=10)  # checkpoints at 4, 8, 12: waits after step 10 to be killed
    wait_for((tmp_path / "killed.paused").exists, "the run to pause after step 10", process=killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    latest = tmp_path / "killed" / "checkpoints" / "latest.json"
    assert json.loads(latest.read_text())["step"] == 8  # killed between the step-8 and step-12 checkpoints
    assert read_metrics(tmp_path / "killed" / "metrics.jsonl")[-1]["step"] == 10  # logged past the checkpoint
    resumed = _run(tmp_path / "killed", 14)
    out_straight, err = straight.communicate(timeout=HANG_GUARD)
    assert straight.returncode == 0, err
    out_resumed, err = resumed.communicate(timeout=HANG_GUARD)
    assert resumed.returncode == 0, err
    final = [line for line in out_straight.splitlines() if line.startswith("FINAL")]
    assert final and final == [line for line in out_resumed.splitlines() if line.startswith("FINAL")]
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the log reads as one run


def test_resuming_a_different_run_is_refused_and_nothing_is_written(tmp_path):
    cfg = config(tmp_path, max_steps=10, save_every=5)
    Trainer(tiny(), cfg, ProgressionData()).fit()
    run = Path(cfg.out_dir)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"different run.*train.lr"):
        Trainer(tiny(), config(tmp_path, max_steps=20, save_every=5, lr=1e-3), ProgressionData()).fit()
    with pytest.raises(ValueError, match="different run.*model"):
        Trainer(tiny(), cfg, ProgressionData(), run_info={"model": "other"}).fit()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_moe_aux_loss_and_bf16_autocast(tmp_path):
    model = tiny(preset="mixtral-8x7b")
    cfg = config(tmp_path, max_steps=3, precision="bf16", aux_loss_weight=0.02)
    last = Trainer(model, cfg, ProgressionData()).fit()
    assert last["aux_loss"] > 0 and last["aux_term"] == pytest.approx(0.02 * last["aux_loss"], rel=1e-3)
    assert next(model.parameters()).dtype == torch.float32  # master weights stay float32


def test_bad_configs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        Trainer(tiny(), config(tmp_path, grad_accum=0), ProgressionData())
    with pytest.raises(ValueError, match="fp16 training needs CUDA"):
        Trainer(tiny(), config(tmp_path, precision="fp16", device="cpu"), ProgressionData())
    with pytest.raises(ValueError, match="precision must be one of"):
        Trainer(tiny(), config(tmp_path, precision="int8"), ProgressionData())
    assert not (tmp_path / "run").exists()
