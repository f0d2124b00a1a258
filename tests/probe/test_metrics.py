"""Probe metrics against their definitions, computed naively."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lucidlm.probe.features import span_max
from lucidlm.probe.metrics import binary_metrics, expected_calibration_error
from lucidlm.probe.train import span_logits


def naive_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.3 * labels + rng.normal(0.35, 0.2, 300), 0, 1).round(2)  # ties included
    m = binary_metrics(scores, labels)
    assert m["auroc"] == pytest.approx(naive_auroc(scores, labels))
    best_f1 = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = (pred & (labels == 1)).sum(), (pred & (labels == 0)).sum(), (~pred & (labels == 1)).sum()
        best_f1 = max(best_f1, 2 * tp / (2 * tp + fp + fn))
    assert m["best_f1"] == pytest.approx(best_f1)
    caught_at = [((scores >= t) & (labels == 1)).sum() / (labels == 1).sum() for t in np.unique(scores)
                 if ((scores >= t) & (labels == 0)).sum() / (labels == 0).sum() <= 0.10]
    assert max(caught_at) <= m["recall_at_10fpr"] + 1e-9  # interpolated ROC: at least the best operating point


def test_ece_by_hand_and_perfect_separation():
    scores = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    labels = np.array([0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(scores, labels) == pytest.approx((2 * 0.05 + 2 * 0.05 + 2 * 0.05) / 6)
    m = binary_metrics(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0 and m["recall_at_10fpr"] == 1.0 and m["best_f1"] == 1.0


def test_span_max_takes_the_highest_token_of_each_span():
    values = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.3, 0.05])
    span = torch.tensor([0, 0, -1, 1, 2, 2])
    assert span_max(values, span, 4).tolist() == pytest.approx([0.7, 0.9, 0.3, float("-inf")])


def test_span_logits_is_a_differentiable_max_over_labelled_spans_only():
    logits = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.3, 0.5], requires_grad=True)
    span = torch.tensor([2, 0, -1, 0, 2, 1])  # tokens of a span need not be contiguous
    maxima, labels = span_logits(logits, span, torch.tensor([1, -100, 0]))
    assert maxima.tolist() == pytest.approx([0.9, 0.3]) and labels.tolist() == [1, 0]
    maxima.sum().backward()
    assert logits.grad.tolist() == [0, 0, 0, 1, 1, 0]  # the gradient reaches each span's maximum only


def test_empty_or_one_class_evaluation_is_an_error():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        binary_metrics(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="needs both classes"):
        binary_metrics(np.array([0.2, 0.4]), np.array([1, 1]))
