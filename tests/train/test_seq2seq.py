"""The small seq2seq loop: the paper's schedule, the loss over non-padding targets, exact match, and
the same model trained by lucidlm's Trainer through its Seq2Seq objective."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lucidlm.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lucidlm.train.objectives import Seq2Seq
from lucidlm.train.seq2seq import exact_match, inverse_sqrt_schedule, paper_peak_lr, seq2seq_loss, train_seq2seq
from lucidlm.train.trainer import TrainConfig, Trainer

PAD, BOS, EOS = 0, 1, 2
BATCH = {
    "src": torch.tensor([[3, 4, 5, PAD], [6, 7, 8, 9]]),
    "tgt": torch.tensor([[BOS, 5, 4, 3, EOS, PAD], [BOS, 9, 8, 7, 6, EOS]]),
}


def tiny_model() -> EncoderDecoder:
    return EncoderDecoder(EncoderDecoderConfig(vocab_size=10, d_model=16, n_heads=2, n_encoder_layers=1,
                                               n_decoder_layers=1, ffn_dim=32, dropout=0.0, max_len=16))


def test_inverse_sqrt_schedule_is_the_papers_equation_3():
    d, warmup = 512, 4000
    schedule = inverse_sqrt_schedule(warmup)
    for step in (0, 1, 99, 3998, 3999, 4000, 10_000, 99_999):
        n = step + 1  # the paper counts steps from 1
        paper = d**-0.5 * min(n**-0.5, n * warmup**-1.5)
        assert math.isclose(paper_peak_lr(d, warmup) * schedule(step), paper, rel_tol=1e-12)
    assert schedule(warmup - 1) == 1.0
    with pytest.raises(ValueError, match="warmup"):
        inverse_sqrt_schedule(0)


def test_loss_is_the_mean_over_non_padding_targets_and_matches_the_trainers_objective():
    model = tiny_model().eval()
    loss = seq2seq_loss(model, BATCH, label_smoothing=0.1)
    logits = model(BATCH["src"], BATCH["tgt"][:, :-1])
    target = BATCH["tgt"][:, 1:]
    keep = target != PAD
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], target[keep], label_smoothing=0.1))
    parts = Seq2Seq(PAD, label_smoothing=0.1)(model, BATCH)
    torch.testing.assert_close(loss, parts.loss_sum / parts.tokens)


def test_exact_match_needs_every_token_and_the_eos():
    target = torch.tensor([[BOS, 5, 4, EOS, PAD], [BOS, 6, EOS, PAD, PAD],
                           [BOS, 7, 8, 9, EOS], [BOS, 3, EOS, PAD, PAD]])
    predictions = torch.tensor([[5, 4, EOS], [6, 6, EOS], [7, 8, 9], [3, EOS, PAD]])  # right, wrong, no EOS, right
    model = SimpleNamespace(config=SimpleNamespace(pad_id=PAD), greedy=lambda src, max_len, src_mask=None: predictions)
    assert exact_match(model, {"src": torch.zeros(4, 3, dtype=torch.long), "tgt": target}) == 0.5


def test_train_seq2seq_fits_one_batch():
    torch.manual_seed(0)
    model = tiny_model()
    seen = []
    losses = train_seq2seq(model, iter([BATCH] * 60), steps=100, lr=1e-2, warmup=10, schedule="cosine",
                           label_smoothing=0.0, log=lambda step, loss: seen.append(step))
    assert len(losses) == 60 and seen == list(range(60))  # the batches ran out first
    assert losses[-1] < 0.05 < losses[0]
    assert not model.training
    assert exact_match(model, BATCH) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        train_seq2seq(model, [BATCH], steps=1, lr=1e-3, schedule="linear")


def test_lucidlm_trainer_trains_and_checkpoints_the_model(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(out_dir=str(tmp_path), max_steps=2, lr=1e-3, warmup_steps=1, save_every=2, eval_every=1000,
                         progress=False)
    Trainer(tiny_model(), config, [BATCH] * 2, objective=Seq2Seq(PAD)).fit()
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2 and (tmp_path / "checkpoints" / latest["dir"] / "model.safetensors").exists()
