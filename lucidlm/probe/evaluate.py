"""Evaluating a probe — and, on the same spans in the same run, the baselines it has to beat.

Scores per token on the predictive alignment (token t scored from position t − 1):
- probe: sigmoid(head(h_L[t − 1]));
- token NLL: −log p(x_t | x_<t), the model's own surprise at the token it produced;
- entropy: H(p(· | x_<t)), the model's uncertainty before producing it;
- random head: a freshly initialised head (what chance looks like through the same pipeline).
Each is reported token-level, in-span (tokens inside annotated spans) and span-max (each span's
maximum); NLL and entropy are unbounded, so their ECE is not meaningful and is dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import LabeledExample, collate
from .metrics import binary_metrics, span_max, token_arrays
from .probe import ProbeHead, hidden_size_of


@torch.no_grad()
def collect(model: nn.Module, heads: dict[str, ProbeHead], layer: int, examples: list[LabeledExample],
            pad_id: int, batch_size: int = 8) -> dict[str, list]:
    """Per batch: scores of every method, labels, span ids and span labels (all (b, s) aligned to tokens)."""
    if not examples:
        raise ValueError("the evaluation set is empty")
    device = next(model.parameters()).device
    model.eval()
    out: dict[str, list] = {"labels": [], "span_ids": [], "span_labels": [], **{k: [] for k in (*heads, "nll",
                                                                                              "entropy")}}
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        res = model(batch["input_ids"], attention_mask=batch["attention_mask"], hidden_layers=[layer])
        logp = torch.log_softmax(res.logits[:, :-1].float(), -1)  # predicts tokens 1..
        nan = torch.full(batch["input_ids"].shape, float("nan"), device=device)
        nll, entropy = nan.clone(), nan.clone()
        nll[:, 1:] = -logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        entropy[:, 1:] = -(logp.exp() * logp).sum(-1)
        for name, head in heads.items():
            scores = nan.clone()
            scores[:, 1:] = head.scores(res.hidden_states[layer][:, :-1])
            out[name].append(scores.cpu())
        out["nll"].append(nll.cpu())
        out["entropy"].append(entropy.cpu())
        for key in ("labels", "span_ids", "span_labels"):
            out[key].append(batch[key].cpu())
    return out


def _levels(scores: list, collected: dict, calibrated: bool) -> dict:
    tok_s, tok_y, in_s, in_y, sp_s, sp_y = [], [], [], [], [], []
    for s, y, ids, sl in zip(scores, collected["labels"], collected["span_ids"], collected["span_labels"]):
        a, b = token_arrays(s, y)
        tok_s.append(a)
        tok_y.append(b)
        a, b = token_arrays(s, y, ids, in_span=True)
        in_s.append(a)
        in_y.append(b)
        a, b = span_max(s, ids, sl)
        sp_s.append(a)
        sp_y.append(b)
    result = {}
    for level, (s, y) in {"token": (tok_s, tok_y), "in_span": (in_s, in_y), "span_max": (sp_s, sp_y)}.items():
        metrics = binary_metrics(np.concatenate(s), np.concatenate(y))
        if not calibrated:
            metrics.pop("ece")
        result[level] = metrics
    return result


def evaluate_probe(model: nn.Module, head: ProbeHead, layer: int, examples: list[LabeledExample], pad_id: int,
                   seed: int = 0) -> dict:
    """{"probe": levels, "baselines": {"nll", "entropy", "random_head": levels}} with levels token / in_span /
    span_max, each {auroc, auprc, recall_at_10fpr, best_f1, ece, n, positives}."""
    torch.manual_seed(seed)
    random_head = ProbeHead(hidden_size_of(model)).to(next(model.parameters()).device).eval()
    collected = collect(model, {"probe": head, "random_head": random_head}, layer, examples, pad_id)
    return {"layer": layer, "probe": _levels(collected["probe"], collected, True),
            "baselines": {"nll": _levels(collected["nll"], collected, False),
                          "entropy": _levels(collected["entropy"], collected, False),
                          "random_head": _levels(collected["random_head"], collected, True)}}
