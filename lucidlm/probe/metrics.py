"""How well scores separate hallucinated from supported tokens and spans.

- AUROC: probability that a random positive outscores a random negative (threshold-free);
- AUPRC: average precision, sensitive to the rare positive class;
- recall at 10% FPR: the share of hallucinations caught while flagging 10% of supported items;
- F1 at the best threshold over the score range;
- ECE: expected calibration error, |mean score − positive rate| averaged over 10 equal-width score
  bins weighted by their size (scores read as probabilities).

Span-level variants take each annotated span's maximum token score ("span max"): a span is flagged
when any of its tokens is.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


def binary_metrics(scores: np.ndarray, labels: np.ndarray, fpr_budget: float = 0.10, bins: int = 10) -> dict:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(scores) == 0:
        raise ValueError("nothing to evaluate: no labelled items")
    if labels.min() == labels.max():
        raise ValueError(f"evaluation needs both classes; all {len(labels)} labels are {labels[0]}")
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"auroc": float(roc_auc_score(labels, scores)), "auprc": float(average_precision_score(labels, scores)),
            "recall_at_10fpr": float(np.interp(fpr_budget, fpr, tpr)), "best_f1": float(f1.max()),
            "ece": expected_calibration_error(scores, labels, bins), "n": int(len(labels)),
            "positives": int(labels.sum())}


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(scores[inside].mean() - labels[inside].mean())
    return float(total)
