"""DPO: the loss is the paper's formula over response log-probs, log 2 at the start, and training
on preference pairs widens the chosen − rejected margin."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.train.dpo import DPO, frozen_reference, sequence_logprob
from lucidlm.train.metrics import read_metrics
from lucidlm.train.trainer import TrainConfig, Trainer


def tiny() -> Transformer:
    model = Transformer(from_preset("llama-125m", tiny=True, vocab_size=32))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def pairs(k: int, n: int = 4) -> dict[str, torch.Tensor]:
    """Prompt of 4 random tokens; chosen continues with tokens 1 2 3 4, rejected with 5 5 5 5 5 (other length)."""
    g = torch.Generator().manual_seed(k)
    prompt = torch.randint(6, 32, (n, 4), generator=g)
    out = {}
    for name, tail in (("chosen", [1, 2, 3, 4]), ("rejected", [5, 5, 5, 5, 5])):
        ids = torch.cat([prompt, torch.tensor(tail).expand(n, -1)], 1)
        labels = ids.clone()
        labels[:, :4] = -100
        out |= {f"{name}_input_ids": ids, f"{name}_labels": labels, f"{name}_attention_mask": torch.ones_like(ids)}
    return out


class PairData:
    def __init__(self):
        self.pos = 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield pairs(self.pos)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_sequence_logprob_sums_response_tokens_only():
    model = tiny()
    batch = pairs(0)
    ids, labels = batch["chosen_input_ids"], batch["chosen_labels"]
    with torch.no_grad():
        logits = model(ids)
    logp = torch.log_softmax(logits, -1)
    naive = [sum(logp[b, t - 1, ids[b, t]].item() for t in range(4, ids.shape[1])) for b in range(ids.shape[0])]
    torch.testing.assert_close(sequence_logprob(logits, labels), torch.tensor(naive), rtol=1e-5, atol=1e-5)


def test_loss_is_the_paper_formula_and_log2_against_itself():
    model = tiny()
    batch = pairs(1)
    parts = DPO(frozen_reference(model), beta=0.1)(model, batch)
    assert parts.tokens == 4
    assert parts.loss_sum.item() == pytest.approx(4 * math.log(2), rel=1e-5)  # π = π_ref: margin 0
    other = tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    parts = DPO(frozen_reference(other), beta=0.3)(model, batch)
    with torch.no_grad():
        def logp(m, side):
            return sequence_logprob(m(batch[f"{side}_input_ids"]), batch[f"{side}_labels"])
        margin = (logp(model, "chosen") - logp(other, "chosen")) - (logp(model, "rejected") - logp(other, "rejected"))
    expected = -F.logsigmoid(0.3 * margin).sum()
    torch.testing.assert_close(parts.loss_sum.detach(), expected, rtol=1e-5, atol=1e-5)


def test_training_widens_the_margin(tmp_path):
    model = tiny()
    config = TrainConfig(out_dir=str(tmp_path / "dpo"), max_steps=12, lr=1e-3, warmup_steps=2, save_every=100,
                         eval_every=100, progress=False)
    Trainer(model, config, PairData(), objective=DPO(frozen_reference(model), beta=0.5)).fit()
    records = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    margins = [r["margin"] for r in records]
    assert margins[0] == pytest.approx(0.0, abs=1e-4)
    assert margins[-1] > 1.0 and records[-1]["accuracy"] == 1.0
    assert records[-1]["loss"] < 0.5 * math.log(2)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPO(lambda ids, mask: ids, beta=0)
