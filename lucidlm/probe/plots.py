"""The probe's pictures: ROC curves (probe vs baselines), reliability diagram, AUROC per layer,
accuracy vs attempt rate. PNG files via matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: str | Path) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_write(png) as tmp:  # never a half-written picture
        fig.savefig(tmp, format="png")
    return png


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], png: str | Path, title: str = "span-max ROC") -> Path:
    """curves: {method: (scores, labels)}; one ROC curve per method with its AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, png)


def plot_reliability(scores: np.ndarray, labels: np.ndarray, png: str | Path, bins: int = 10) -> Path:
    """Observed hallucination rate per score bin against the diagonal of perfect calibration."""
    plt = _pyplot()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    centers = (edges[:-1] + edges[1:]) / 2
    rate = [labels[which == b].mean() if (which == b).any() else np.nan for b in range(bins)]
    count = [(which == b).sum() for b in range(bins)]
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.bar(centers, rate, width=1 / bins, edgecolor="k", alpha=0.7, label="observed rate")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for c, r, n in zip(centers, rate, count):
        if n:
            ax.text(c, min(r + 0.02, 0.95), str(n), ha="center", fontsize=7)
    ax.set(xlabel="probe score", ylabel="fraction hallucinated", xlim=(0, 1), ylim=(0, 1),
           title="reliability (span max)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, png)


def plot_auroc_per_layer(summary: dict[str, float] | dict[str, dict[str, float]], png: str | Path,
                         ylabel: str = "span-max AUROC") -> Path:
    """One line of AUROC per block, or one line per series ({series: {block: auroc}})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    series = summary if all(isinstance(v, dict) for v in summary.values()) else {"": summary}
    for name, per_layer in series.items():
        ax.plot([int(k) for k in per_layer], list(per_layer.values()), "o-", label=name or None)
    ax.set(xlabel="probed block", ylabel=ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, png)


def plot_attempt_curves(curves: dict[str, list[dict]], png: str | Path) -> Path:
    """Selective answering: accuracy of the claims stated vs the fraction of claims stated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    for name, rows in curves.items():
        ax.plot([r["attempt_rate"] for r in rows], [r["accuracy"] for r in rows], "o-", ms=3, label=name)
    ax.set(xlabel="attempt rate (claims stated)", ylabel="accuracy of stated claims", title="selective answering")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, png)


def plot_abstention_frontier(curves: dict[str, list[tuple[float, float]]], points: dict[str, tuple[float, float]],
                             png: str | Path, max_known: float = 0.05, min_unknowable: float = 0.5) -> Path:
    """Abstention on known entities (x) vs on unknowable ones (y): each gate's threshold sweep as a curve,
    each run as a point in the legend; dashed lines at the targets (the good corner is top left)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name, xy in curves.items():
        ax.plot(*zip(*sorted(xy)), lw=1.2, label=name)
    for (name, (x, y)), marker in zip(points.items(), "osD^v<>phX*" * 4):
        ax.plot(x, y, marker, ms=6, mfc="none", mew=1.5, label=name)
    ax.axvline(max_known, color="grey", lw=0.8, ls="--")
    ax.axhline(min_unknowable, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="abstention on known entities", ylabel="abstention on unknowable entities", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title="abstention: gates on the base vs trained models")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    png = _save(fig, png)
    plt.close(fig)
    return png
