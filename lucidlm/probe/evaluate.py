"""Evaluating a probe — and, on the same spans in the same run, the baselines it has to beat.

Scores per token on the predictive alignment (token t scored from position t − 1):
- probe: sigmoid(head(h_L[t − 1]));
- token NLL: −log p(x_t | x_<t), the model's own surprise at the token it produced;
- entropy: H(p(· | x_<t)), the model's uncertainty before producing it;
- random head: a freshly initialised head (what chance looks like through the same pipeline).
For a LoRA probe the NLL and entropy come from the base model (adapters off) — the model users would
run without the probe — and the report adds ``lora_kl_to_base``: the mean KL(base ‖ probed) of the
next-token distributions over response tokens, what the adapter costs generation.
Each is reported token-level, in-span (tokens inside annotated spans) and span-max (each span's
maximum); NLL and entropy are unbounded, so their ECE is not meaningful and is dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model.lora import disabled
from .data import IGNORE, LabeledExample, collate
from .metrics import binary_metrics, span_max, token_arrays
from .plots import plot_reliability, plot_roc
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
    adapted = getattr(model, "lora_config", None) is not None  # a LoRA probe: baselines use the base model
    kl_sum, kl_tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        res = model(batch["input_ids"], attention_mask=batch["attention_mask"], hidden_layers=[layer])
        base_logits = res.logits
        if adapted:
            with disabled(model):
                base_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
            response = ((batch["labels"] != IGNORE) | (batch["span_ids"] >= 0))[:, 1:]
            log_p = torch.log_softmax(base_logits[:, :-1].float(), -1)[response]
            log_q = torch.log_softmax(res.logits[:, :-1].float(), -1)[response]
            kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
            kl_tokens += int(response.sum())
        logp = torch.log_softmax(base_logits[:, :-1].float(), -1)  # predicts tokens 1..
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
    if adapted:  # what the LoRA costs generation: KL(base || probed) per response token
        out["lora_kl"] = kl_sum / max(kl_tokens, 1)
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


METHODS = ("probe", "nll", "entropy", "random_head")


def span_arrays(collected: dict, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(span-max scores, span labels) of one method over every labelled span, in example order."""
    pairs = [span_max(s, ids, sl) for s, ids, sl in zip(collected[method], collected["span_ids"],
                                                         collected["span_labels"])]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def collect_all(model: nn.Module, head: ProbeHead, layer: int, examples: list[LabeledExample], pad_id: int,
                seed: int = 0) -> dict:
    """``collect`` for the probe and, as the chance reference, a random head initialised from ``seed``."""
    torch.manual_seed(seed)
    random_head = ProbeHead(hidden_size_of(model)).to(next(model.parameters()).device).eval()
    return collect(model, {"probe": head, "random_head": random_head}, layer, examples, pad_id)


def report(collected: dict, layer: int) -> dict:
    """{"probe": levels, "baselines": {"nll", "entropy", "random_head": levels}} with levels token / in_span /
    span_max, each {auroc, auprc, recall_at_10fpr, best_f1, ece, n, positives}."""
    result = {"layer": layer, "probe": _levels(collected["probe"], collected, True),
              "baselines": {name: _levels(collected[name], collected, name == "random_head") for name in METHODS[1:]}}
    if "lora_kl" in collected:
        result["lora_kl_to_base"] = collected["lora_kl"]
    return result


def evaluate_probe(model: nn.Module, head: ProbeHead, layer: int, examples: list[LabeledExample], pad_id: int,
                   seed: int = 0, plots: str | Path | None = None) -> dict:
    """The report of ``report``; with ``plots``, also roc.png (every method) and reliability.png there."""
    collected = collect_all(model, head, layer, examples, pad_id, seed)
    result = report(collected, layer)
    if plots is not None:
        curves = {m: span_arrays(collected, m) for m in METHODS}
        plot_roc(curves, Path(plots) / "roc.png")
        plot_reliability(*curves["probe"], Path(plots) / "reliability.png")
    return result
