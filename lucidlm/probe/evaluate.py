"""Evaluating a probe — and, on the same tokens and spans of the same forward, the baselines it has to beat.

Scores per token (features.py: one forward per conversation):
- probe: sigmoid(head(h_L)) at the probe's alignment;
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

from .data import LabeledExample
from .features import TokenFeatures, extract, span_max
from .metrics import binary_metrics
from .plots import plot_reliability, plot_roc
from .probe import Alignment, ProbeHead

METHODS = ("probe", "nll", "entropy", "random_head")


def random_head(hidden_size: int, seed: int) -> ProbeHead:
    torch.manual_seed(seed)
    return ProbeHead(hidden_size).eval()


@torch.no_grad()
def method_scores(feats: TokenFeatures, head: ProbeHead, layer: int, alignment: Alignment,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Per kept token (N,), the score of every method (higher = more likely hallucinated)."""
    x = feats.features(layer, alignment)
    head = head.cpu()
    return {"probe": head.scores(x), "nll": feats.nll, "entropy": feats.entropy,
            "random_head": random_head(x.shape[1], seed).scores(x)}


def span_arrays(feats: TokenFeatures, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(span-max value, label) of every labelled span that has a token, in span order."""
    maxima = span_max(values.double(), feats.span, len(feats.span_labels))
    keep = ((feats.span_labels == 0) | (feats.span_labels == 1)) & torch.isfinite(maxima)
    return maxima[keep].numpy(), feats.span_labels[keep].numpy()


def levels(values: torch.Tensor, feats: TokenFeatures, calibrated: bool) -> dict:
    labelled = (feats.labels == 0) | (feats.labels == 1)
    in_span = labelled & (feats.span >= 0)
    result = {"token": binary_metrics(values[labelled].double().numpy(), feats.labels[labelled].numpy()),
              "in_span": binary_metrics(values[in_span].double().numpy(), feats.labels[in_span].numpy()),
              "span_max": binary_metrics(*span_arrays(feats, values))}
    if not calibrated:
        for metrics in result.values():
            metrics.pop("ece")
    return result


def report(feats: TokenFeatures, scores: dict[str, torch.Tensor], layer: int, alignment: Alignment) -> dict:
    """{"probe": levels, "baselines": {"nll", "entropy", "random_head": levels}} with levels token / in_span /
    span_max, each {auroc, auprc, recall_at_10fpr, best_f1, ece, n, positives}."""
    result = {"layer": layer, "alignment": alignment, "probe": levels(scores["probe"], feats, True),
              "baselines": {m: levels(scores[m], feats, m == "random_head") for m in METHODS[1:]}}
    if feats.lora_kl is not None:
        result["lora_kl_to_base"] = feats.lora_kl
    return result


def evaluate_probe(model: nn.Module, head: ProbeHead, layer: int, examples: list[LabeledExample], pad_id: int,
                   alignment: Alignment = "own", seed: int = 0, plots: str | Path | None = None) -> dict:
    """The report of ``report``; with ``plots``, also roc.png (every method) and reliability.png there."""
    feats = extract(model, examples, [layer], pad_id, (alignment,))
    scores = method_scores(feats, head, layer, alignment, seed)
    result = report(feats, scores, layer, alignment)
    if plots is not None:
        curves = {m: span_arrays(feats, scores[m]) for m in METHODS}
        plot_roc(curves, Path(plots) / "roc.png")
        plot_reliability(*curves["probe"], Path(plots) / "reliability.png")
    return result
