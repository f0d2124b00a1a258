"""Claim-level evaluation on a benchmark whose rows say what each claim is about.

Rows carry, beside the probe data format, ``type`` (the question type), ``entity``, ``id`` (the question),
``sample`` (0 = greedy) and per annotation ``value`` (the normalised claimed value) and optionally
``attribute`` (which fact of a long-form answer). Each labelled span becomes one claim; every method's
span-max score sits beside it, with two baselines that need no hidden state:
- claimed-value prior: how often this value was wrong when claimed in the training rows (a model that
  answers "United States" for every city is caught by it);
- sample disagreement: the share of sampled answers to the same question whose value for the same
  attribute differs from the greedy one's (SelfCheckGPT's idea; greedy claims only).
AUROC comes pooled and within each question type (the type alone predicts error rates), with bootstrap
confidence intervals that resample entities (claims about one entity are not independent).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from .features import TokenFeatures, span_max

CLAIM_FIELDS = ("type", "entity", "id", "sample", "value", "attribute")


@dataclass
class Claims:
    """One entry per labelled span: metadata arrays, labels (1 = not supported) and method scores."""

    meta: dict[str, np.ndarray]
    labels: np.ndarray
    scores: dict[str, np.ndarray]

    def subset(self, keep: np.ndarray) -> Claims:
        return Claims({k: v[keep] for k, v in self.meta.items()}, self.labels[keep],
                      {k: v[keep] for k, v in self.scores.items()})

    def __len__(self) -> int:
        return len(self.labels)


def claim_of(row: dict, annotation: dict) -> dict:
    return {"type": row.get("type", ""), "entity": row.get("entity", ""), "id": row.get("id", ""),
            "sample": int(row.get("sample", 0)), "value": annotation.get("value", annotation["span"]),
            "attribute": annotation.get("attribute", row.get("type", ""))}


def claims(rows: list[dict], feats: TokenFeatures, token_scores: dict[str, torch.Tensor]) -> Claims:
    """The labelled spans of ``rows`` (the examples ``feats`` was extracted from, same order) as claims."""
    maxima = {m: span_max(v.double(), feats.span, len(feats.span_labels)) for m, v in token_scores.items()}
    first = next(iter(maxima.values()))
    keep = ((feats.span_labels == 0) | (feats.span_labels == 1)) & torch.isfinite(first)
    index = torch.nonzero(keep)[:, 0].tolist()
    meta = [claim_of(rows[int(feats.span_example[i])], rows[int(feats.span_example[i])]["annotations"]
                     [int(feats.span_index[i])]) for i in index]
    return Claims({k: np.array([c[k] for c in meta]) for k in CLAIM_FIELDS}, feats.span_labels[keep].numpy(),
                  {m: v[keep].numpy() for m, v in maxima.items()})


def value_prior(train: Claims, smoothing: float = 1.0):
    """(type, value) -> smoothed training error rate of that value, falling back to the type's rate."""
    wrong: Counter = Counter()
    seen: Counter = Counter()
    for t, v, y in zip(train.meta["type"], train.meta["value"], train.labels):
        wrong[t, v] += int(y)
        seen[t, v] += 1
        wrong[t] += int(y)
        seen[t] += 1

    def prior(t: str, v: str) -> float:
        base = wrong[t] / seen[t] if seen[t] else float(train.labels.mean())
        return (wrong[t, v] + smoothing * base) / (seen[t, v] + smoothing)

    return prior


def add_value_prior(test: Claims, train: Claims) -> None:
    prior = value_prior(train)
    test.scores["value_prior"] = np.array([prior(t, v) for t, v in zip(test.meta["type"], test.meta["value"])])


def add_sample_disagreement(test: Claims, rows: list[dict]) -> None:
    """Greedy claims only (others get NaN): the share of the question's samples that do not repeat the value."""
    said: dict[tuple, list[set]] = defaultdict(list)  # (question, attribute) -> values of each sample
    samples: dict[str, int] = Counter()
    for row in rows:
        if int(row.get("sample", 0)) == 0:
            continue
        samples[row.get("id", "")] += 1
        values = defaultdict(set)
        for a in row["annotations"]:
            c = claim_of(row, a)
            values[c["attribute"]].add(c["value"])
        for attribute, vals in values.items():
            said[row.get("id", ""), attribute].append(vals)
    out = np.full(len(test), np.nan)
    for i, (q, attribute, value, sample) in enumerate(zip(test.meta["id"], test.meta["attribute"],
                                                          test.meta["value"], test.meta["sample"])):
        if sample == 0 and samples[q]:
            agree = sum(value in vals for vals in said[q, attribute])
            out[i] = 1.0 - agree / samples[q]
    test.scores["sample_disagreement"] = out


def value_disjoint(test: Claims, train: Claims) -> np.ndarray:
    """Mask of test claims whose value was never claimed in training for the same question type."""
    trained = set(zip(train.meta["type"], train.meta["value"]))
    return np.array([(t, v) not in trained for t, v in zip(test.meta["type"], test.meta["value"])], dtype=bool)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC from average ranks (ties count one half): sklearn's value, fast enough to bootstrap."""
    ranks = rankdata(scores)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_ci(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> dict:
    """AUROC and a percentile bootstrap interval over groups (entities), resampled with replacement."""
    ok = ~np.isnan(scores)
    scores, labels, groups = scores[ok], labels[ok], groups[ok]
    out = {"n": int(len(labels)), "positives": int(labels.sum())}
    if len(labels) == 0 or labels.min() == labels.max():
        return {**out, "auroc": float("nan"), "lo": float("nan"), "hi": float("nan")}
    out["auroc"] = auroc(scores, labels)
    names, member = np.unique(groups, return_inverse=True)
    by_group = [np.flatnonzero(member == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = np.concatenate([by_group[g] for g in rng.integers(0, len(names), len(names))])
        if labels[idx].min() != labels[idx].max():
            stats.append(auroc(scores[idx], labels[idx]))
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {**out, "lo": float(lo), "hi": float(hi)}


def claims_report(test: Claims, methods: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """{"all": {method: auroc_ci}, "by_type": {type: {method: auroc_ci}}} (+ accuracy per type)."""
    def block(c: Claims) -> dict:
        return {m: auroc_ci(c.scores[m], c.labels, c.meta["entity"], n_boot, seed) for m in methods
                if m in c.scores}

    def accuracy(c: Claims) -> float | None:
        return float(1 - c.labels.mean()) if len(c) else None

    by_type = {}
    for t in sorted(set(test.meta["type"])):
        sub = test.subset(test.meta["type"] == t)
        by_type[t] = {"claims": len(sub), "accuracy": accuracy(sub), **block(sub)}
    return {"all": {"claims": len(test), "accuracy": accuracy(test), **block(test)}, "by_type": by_type}
