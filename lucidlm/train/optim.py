"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule.

Weight decay pulls weights toward zero; on gains and biases (1-D: norms, biases) it only fights
the parameterisation, so — as GPT-2/3, LLaMA and nanoGPT do — only tensors with >= 2 dims decay
(AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"). The schedule warms up
linearly (Adam's early second-moment estimates are noisy), then follows a half cosine down to
``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: >= 2-D (decayed) and the rest (not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"bad schedule: warmup_steps={warmup_steps}, total_steps={total_steps}, "
                         f"min_lr_ratio={min_lr_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
