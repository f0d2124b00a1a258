"""A small, self-contained training loop for encoder–decoder models, with the paper's recipe
(Vaswani et al. 2017 §5.3–5.4): Adam with β = (0.9, 0.98), ε = 1e-9, the learning rate warmed up
linearly and then decayed as 1/√step, label smoothing. For toy seq2seq tasks and the CLI; large
runs belong to ``train/trainer.py``.

Batches are dicts: ``src`` (batch, src_len) padded with pad_id; ``tgt`` (batch, tgt_len) = BOS, the
target, EOS, then padding; optional ``src_mask`` (batch, src_len). The model reads tgt[:, :-1]
(teacher forcing) and is scored on tgt[:, 1:], padding ignored — the batches the Trainer's
``objectives.Seq2Seq`` reads, so a run can move to the full Trainer unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .optim import warmup_cosine


def inverse_sqrt_schedule(warmup: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based), the paper's eq. 3:
    min(n / warmup, √(warmup / n)) with n = step + 1 — linear warmup, then 1/√n decay."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1, got {warmup}")
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def paper_peak_lr(d_model: int, warmup: int = 4000) -> float:
    """Eq. 3's peak: d_model^-0.5 · warmup^-0.5 (7.0e-4 for the base model's 512 and 4000 steps)."""
    return d_model**-0.5 * warmup**-0.5


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross entropy of the next target token over the non-padding targets."""
    tgt = batch["tgt"]
    logits = model(batch["src"], tgt[:, :-1], batch.get("src_mask"))  # (b, t-1, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=model.config.pad_id,
                           label_smoothing=label_smoothing)


def train_seq2seq(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int = 4000,
    schedule: Literal["inverse_sqrt", "cosine"] = "inverse_sqrt",
    label_smoothing: float = 0.1,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-9,
    clip_norm: float | None = 1.0,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` optimizer steps (one batch each, fewer if ``batches`` runs out)
    at peak learning rate ``lr``; returns the loss of every step and leaves the model in eval mode.

    ``schedule``: the paper's warmup then 1/√step decay, or warmup then a half cosine to zero at
    ``steps`` (a short run ends sharper with it). AdamW decays matrices (≥ 2-D) only; with
    weight_decay=0, the paper's setting, it is Adam. ``log(step, loss)`` is called after every step.
    """
    if schedule not in ("inverse_sqrt", "cosine"):
        raise ValueError(f"schedule must be 'inverse_sqrt' or 'cosine', got {schedule!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    multiplier = inverse_sqrt_schedule(warmup) if schedule == "inverse_sqrt" else warmup_cosine(warmup, steps, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    model.train()
    losses: list[float] = []
    for step, batch in zip(range(steps), batches):
        loss = seq2seq_loss(model, batch, label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def exact_match(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Fraction of rows whose greedy output equals the target exactly, EOS included."""
    target = batch["tgt"][:, 1:]  # (b, n): the target, EOS, padding
    pred = model.greedy(batch["src"], target.shape[1], batch.get("src_mask"))  # (b, ≤ n), padded after EOS
    pred = F.pad(pred, (0, target.shape[1] - pred.shape[1]), value=model.config.pad_id)
    return (pred == target).all(1).float().mean().item()

