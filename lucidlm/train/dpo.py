"""Direct Preference Optimization (Rafailov et al. 2023), as an objective for the trainer.

For a prompt x with a preferred response y_w and a rejected one y_l:

    loss = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

log π(y|x) sums the token log-probabilities of the response only (prompt tokens carry label −100).
π_ref is a frozen copy of the starting model — or, when training LoRA, the same model with its
adapters disabled, which needs no second copy of the weights. β sets how far π may move from π_ref.

Batches hold ``chosen_*`` and ``rejected_*`` versions of input_ids / labels / attention_mask; the
trainer averages the loss over pairs (``count``), not tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .objectives import IGNORE_INDEX, LossParts

# reference(input_ids, attention_mask) -> logits (batch, seq, vocab), computed without gradients
Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) sum over response tokens of log p(label_t+1 | ..t); logits (batch, seq, vocab)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (b, s-1, V)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]  # (b, s-1)
    return (picked * mask).sum(-1)


def frozen_reference(model: nn.Module) -> Reference:
    """The model as it is now, frozen: a deep copy in eval mode."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return lambda ids, mask: ref(ids, attention_mask=mask)


class DPO:
    def __init__(self, reference: Reference, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.reference, self.beta, self.label_smoothing = reference, beta, label_smoothing

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        n = self.count(batch)
        # chosen and rejected in one forward: (2n, seq) after padding to a common length
        ids, mask, labels = stack_pairs(batch)
        policy = sequence_logprob(model(ids, attention_mask=mask), labels)
        with torch.no_grad():
            ref = sequence_logprob(self.reference(ids, mask), labels)
        ratio = policy - ref  # (2n,) log π/π_ref per sequence
        margin = ratio[:n] - ratio[n:]  # (n,)
        logits = self.beta * margin
        # conservative DPO (cDPO) when label_smoothing > 0: the labels may be flipped with that probability
        losses = -(1 - self.label_smoothing) * F.logsigmoid(logits) - self.label_smoothing * F.logsigmoid(-logits)
        metrics = {"margin": float(margin.detach().mean()), "accuracy": float((margin > 0).float().mean()),
                   "chosen_reward": float(self.beta * ratio[:n].detach().mean()),
                   "rejected_reward": float(self.beta * ratio[n:].detach().mean())}
        return LossParts(losses.sum(), n, None, metrics)


def stack_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels) of the chosen rows then the rejected ones, (2n, longest), right-padded."""
    parts = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
        length = max(chosen.shape[1], rejected.shape[1])
        parts[key] = torch.cat([F.pad(chosen, (0, length - chosen.shape[1]), value=pad),
                                F.pad(rejected, (0, length - rejected.shape[1]), value=pad)])
    return parts["input_ids"], parts["attention_mask"], parts["labels"]
