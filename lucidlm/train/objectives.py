"""What a training step minimises, given a batch: the trainer handles the optimisation mechanics.

Batches follow Hugging Face's convention: ``labels`` are aligned with ``input_ids`` and the loss
compares the logits at position t with the label at t + 1; label -100 (IGNORE_INDEX) marks tokens
that are not trained (prompt tokens in SFT, padding).

An objective returns the *sum* of token losses and the number of tokens, so that gradient
accumulation and data-parallel ranks can divide by the token count of the whole step: a step then
gives the same gradient however it is split into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # scalar: summed over the counted tokens
    tokens: int  # tokens counted (labels != IGNORE_INDEX after the shift)
    extra: torch.Tensor | None = None  # a per-micro-batch term added as is (MoE aux loss · weight)
    metrics: dict[str, float] = field(default_factory=dict)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a batch contributes to the loss (what the step's mean divides by)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross entropy of logits (batch, seq, vocab) predicting labels shifted by one."""
    pred = logits[:, :-1].flatten(0, 1).float()  # (batch·(seq-1), vocab)
    target = labels[:, 1:].flatten()
    loss = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


class CausalLM:
    """Next-token prediction (pretraining, SFT) plus the MoE load-balancing loss times its weight."""

    def __init__(self, aux_loss_weight: float = 0.01) -> None:
        self.aux_loss_weight = aux_loss_weight

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        core = getattr(model, "module", model)  # under DDP the config is on the wrapped module
        moe = getattr(getattr(core, "config", None), "moe", None) is not None
        inputs = dict(attention_mask=batch.get("attention_mask"), prefix_mask=batch.get("prefix_mask"))
        if not moe:
            loss_sum, tokens = shifted_token_loss(model(batch["input_ids"], **inputs), batch["labels"])
            return LossParts(loss_sum, tokens)
        # a wrapper of the model (DistributedTrainer's DDP, FSDP2) runs forward_outputs through its hooks too
        out = model.forward_outputs(batch["input_ids"], **inputs, return_aux_loss=True)
        loss_sum, tokens = shifted_token_loss(out.logits, batch["labels"])
        if out.aux_loss is None:
            return LossParts(loss_sum, tokens)
        extra = self.aux_loss_weight * out.aux_loss if self.aux_loss_weight else None
        return LossParts(loss_sum, tokens, extra, {"aux_loss": float(out.aux_loss.detach())})


class Seq2Seq:
    """Next-target-token loss for an encoder–decoder: batches hold ``src`` (b, s) and ``tgt`` (b, t) =
    BOS, the target, EOS, then padding; the model reads tgt[:, :-1] and predicts tgt[:, 1:]."""

    def __init__(self, pad_id: int, label_smoothing: float = 0.0) -> None:
        self.pad_id, self.label_smoothing = pad_id, label_smoothing

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["tgt"][:, 1:] != self.pad_id).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        tgt = batch["tgt"]
        logits = model(batch["src"], tgt[:, :-1], batch.get("src_mask"))  # (b, t-1, vocab)
        target = tgt[:, 1:].masked_fill(tgt[:, 1:] == self.pad_id, IGNORE_INDEX)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=self.label_smoothing)
        return LossParts(loss, int((target != IGNORE_INDEX).sum()))
