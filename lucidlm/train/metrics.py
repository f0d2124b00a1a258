"""Training metrics as JSONL (one object per logged step) and the loss curve drawn from them."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_io import atomic_write
from ..jsonl import read_rows, write_jsonl


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the step the run resumes from
    so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:  # a non-zero rank of a distributed run
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # a line torn by a kill mid-write (or planted) is dropped, not a failed resume
            kept = [r for r in read_metrics(path, strict=False) if _step(r) <= resume_step]
            write_jsonl(path, kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, strict: bool = True) -> list[dict]:
    """The records of a metrics.jsonl; a bad line raises DataError naming it, or (strict=False) is left out."""
    return [r for _, r in read_rows(path, 0, lambda row: row, skip_bad_lines=not strict, on_skip=lambda _: None)]


def _step(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, int | float) else float("inf")  # a record without a usable step: dropped


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, png_path: Path) -> Path:
    """The figure as a PNG, written atomically (a reader never sees half an image), then closed."""
    fig.tight_layout()
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "training loss") -> Path:
    """Train loss per step (and validation loss where measured) against steps, as a PNG."""
    plt = _pyplot()
    records = read_metrics(metrics_path, strict=False)  # a torn or planted line does not fail a finished run
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    skipped = [(r["step"], r["skipped_loss"]) for r in records if "skipped_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    if skipped:
        ax.plot(*zip(*skipped), "rx", label="skipped (spike)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val or skipped:  # a run that logged no loss yet draws empty axes, without a legend to warn about
        ax.legend()
    return _save_png(plt, fig, png_path)


def plot_reward_curve(metrics_path: Path, png_path: Path, title: str = "RL reward") -> Path:
    """An RL run's mean reward per step (total and each source: the records' ``reward`` and ``reward_<name>``),
    with a 10-step moving average over the noisy per-step means, as a PNG."""
    plt = _pyplot()
    records = read_metrics(metrics_path, strict=False)
    keys = ["reward"] + sorted({k for r in records for k in r if k.startswith("reward_")})
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if not points:
            continue
        steps, values = zip(*points)
        line, = ax.plot(steps, values, linewidth=0.6, alpha=0.4)
        smooth = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=1.5, label=f"{key} (10-step mean)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward per response")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    return _save_png(plt, fig, png_path)
