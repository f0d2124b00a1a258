"""Training a probe head (and optionally LoRA on the layers up to it), as in Obeso et al. (2025).

Loss per batch, on the predictive alignment (the head reads h[t − 1] to score token t):
    token BCE over labelled tokens (positives weighted by ``pos_weight``, default #neg / #pos)
  + w(step) · span-max BCE: each annotated span's maximum logit against the span's label, with
    w rising linearly from 0 to 1 over the first ``anneal_fraction`` of training (token-level
    signal first, then the span decision the evaluation uses)
  + with LoRA: kl_weight · KL(p_base ‖ p_probed) on next-token distributions over response tokens,
    p_base from the same model with its adapters off, so the probe cannot buy accuracy by
    degrading generation.
The head and the LoRA parameters get separate learning rates. ``sweep`` trains one head per layer
in a single pass over the data (every layer's hidden state comes out of the same forward).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.lora import LoRAConfig, apply_lora, disabled
from ..progress import progress_bar
from .data import IGNORE, LabeledExample, collate
from .probe import ProbeHead, hidden_size_of


@dataclass
class ProbeTrainConfig:
    layer: int
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3  # head
    lora_lr: float = 1e-4
    weight_decay: float = 0.0
    pos_weight: float | None = None  # None: negatives / positives in the training labels
    anneal_fraction: float = 0.5  # span-max weight reaches 1 after this fraction of the steps
    lora: LoRAConfig | None = None  # applied to blocks 0..layer
    kl_weight: float = 0.5
    seed: int = 0
    progress: bool | None = None


def probe_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], pos_weight: float,
               span_weight: float) -> torch.Tensor:
    """logits (b, s−1): head outputs for tokens 1..s−1 (read from positions 0..s−2)."""
    labels, span_ids = batch["labels"][:, 1:], batch["span_ids"][:, 1:]
    keep = labels != IGNORE
    weight = torch.tensor(pos_weight, device=logits.device)
    token = F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float(), pos_weight=weight)
    if span_weight == 0:
        return token
    span_logits, span_targets = [], []
    for row, spans in enumerate(batch["span_labels"].tolist()):
        for s, label in enumerate(spans):
            inside = span_ids[row] == s
            if label in (0, 1) and inside.any():
                span_logits.append(logits[row][inside].max())
                span_targets.append(float(label))
    if not span_logits:
        return token
    span = F.binary_cross_entropy_with_logits(torch.stack(span_logits).float(),
                                              torch.tensor(span_targets, device=logits.device), pos_weight=weight)
    return token + span_weight * span


def _batches(examples: list[LabeledExample], batch_size: int, pad_id: int, rng: random.Random):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)


def default_pos_weight(examples: list[LabeledExample]) -> float:
    pos = sum(y == 1 for e in examples for y in e.labels)
    neg = sum(y == 0 for e in examples for y in e.labels)
    if pos == 0 or neg == 0:
        raise ValueError(f"probe training needs both classes: {pos} positive and {neg} negative tokens")
    return neg / pos


def _hidden(model: nn.Module, batch: dict, layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], hidden_layers=layers)
    return out.logits, out.hidden_states


def train_probe(model: nn.Module, examples: list[LabeledExample], config: ProbeTrainConfig,
                pad_id: int) -> ProbeHead:
    """Train a head on block ``config.layer`` (and LoRA on blocks ≤ layer when ``config.lora`` is set)."""
    return sweep(model, examples, [config.layer], config, pad_id)[config.layer]


def sweep(model: nn.Module, examples: list[LabeledExample], layers: list[int], config: ProbeTrainConfig,
          pad_id: int) -> dict[int, ProbeHead]:
    """One head per layer, all trained from the same forwards (LoRA only with a single layer)."""
    n_blocks = model.config.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise IndexError(f"probe layers {bad} out of range for a model of {n_blocks} blocks")
    if not examples:
        raise ValueError("no training examples")
    if config.lora is not None and len(layers) != 1:
        raise ValueError("LoRA probes train one layer at a time")
    pos_weight = config.pos_weight if config.pos_weight is not None else default_pos_weight(examples)
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    heads = {layer: ProbeHead(hidden_size_of(model)).to(device) for layer in layers}
    groups = [{"params": [p for h in heads.values() for p in h.parameters()], "lr": config.lr}]
    if config.lora is not None:
        lora = LoRAConfig(**{**config.lora.__dict__, "layers": list(range(layers[0] + 1))})
        apply_lora(model, lora)
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lora_lr})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    batches = _batches(examples, min(config.batch_size, len(examples)), pad_id, random.Random(config.seed))
    model.train(config.lora is not None)
    anneal = max(1, int(config.anneal_fraction * config.steps))
    with progress_bar(config.steps, "probe", config.progress) as advance:
        for step in range(config.steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with torch.set_grad_enabled(config.lora is not None):
                logits, hidden = _hidden(model, batch, layers)
            span_weight = min(1.0, step / anneal)
            loss = sum(probe_loss(head(hidden[layer][:, :-1]), batch, pos_weight, span_weight)
                       for layer, head in heads.items())
            if config.lora is not None and config.kl_weight:
                loss = loss + config.kl_weight * _kl_to_base(model, batch, logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            advance(1)
    model.eval()
    return {layer: head.eval() for layer, head in heads.items()}


def _kl_to_base(model: nn.Module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_probed) averaged over response tokens (labelled or inside a span)."""
    with torch.no_grad(), disabled(model):
        base = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    response = ((batch["labels"] != IGNORE) | (batch["span_ids"] >= 0))[:, 1:]  # predictions of tokens 1..
    log_p = torch.log_softmax(base[:, :-1].float(), -1)[response]
    log_q = torch.log_softmax(logits[:, :-1].float(), -1)[response]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
