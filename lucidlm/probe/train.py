"""Training a probe head (and optionally LoRA on the layers up to it), as in Obeso et al. (2025) and its code.

Loss, on the probe's alignment (token t read from h[t], "own", or h[t − 1], "predictive"):
    (1 − ω) · token BCE over labelled response tokens, tokens inside annotated spans weighted
              ``span_token_weight`` (10 in the reference code), the others 1
  +  ω      · span-max BCE: each annotated span's maximum logit against the span's label,
    ω rising linearly from 0 to 1 over the first ``anneal_fraction`` of training (the reference anneals
    over the whole run: token-level signal first, then the span decision the evaluation uses)
  + l2 · |w|² on the head's weights (the regularisation a validation split chooses, see selection.py)
  + with LoRA: kl_weight · KL(p_base ‖ p_probed) on next-token distributions over response tokens,
    p_base from the same model with its adapters off, so the probe cannot buy accuracy by
    degrading generation.
A frozen model's probe trains on stored features (features.py: one forward per conversation, all
layers at once), full batch, on standardised inputs whose scaling is folded back into the head — so a
layer sweep costs one pass over the data. A LoRA probe needs the forward in the loop: mini-batches,
separate learning rates for the head and the adapters.
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
from .features import TokenFeatures, extract
from .probe import Alignment, ProbeHead, aligned_hidden, check_alignment, hidden_size_of


@dataclass
class ProbeTrainConfig:
    layer: int
    alignment: Alignment = "own"
    steps: int = 300
    batch_size: int = 8  # LoRA: conversations per step (a frozen model's probe trains full batch)
    lr: float = 1e-2  # head (on standardised features when frozen)
    lora_lr: float = 1e-4
    l2: float = 1e-3  # penalty on the head's weights (frozen: on the standardised scale)
    span_token_weight: float = 10.0  # token BCE weight of tokens inside annotated spans
    anneal_fraction: float = 1.0  # span-max weight ω reaches 1 after this fraction of the steps
    lora: LoRAConfig | None = None  # applied to blocks 0..layer
    kl_weight: float = 0.5
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        check_alignment(self.alignment)


def probe_loss(logits: torch.Tensor, labels: torch.Tensor, spans: SpanGrid, omega: float,
               span_token_weight: float) -> torch.Tensor:
    """Flat tensors: logits and labels of N tokens; ``spans`` groups those tokens by labelled span."""
    keep = labels != IGNORE
    weight = torch.where(spans.span[keep] >= 0, span_token_weight, 1.0)
    token = (F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float(), reduction="none")
             * weight).sum() / weight.sum().clamp_min(1e-9)
    if omega == 0 or spans.targets.numel() == 0:
        return token
    span = F.binary_cross_entropy_with_logits(spans.maxima(logits).float(), spans.targets.float())
    return (1 - omega) * token + omega * span


class SpanGrid:
    """The tokens of each labelled span as rows of an index grid (padded with an index past the end), built once
    per set of tokens, so each step's span-max is one gather and a max."""

    def __init__(self, span: torch.Tensor, span_labels: torch.Tensor) -> None:
        self.span = span
        inside = torch.nonzero(span >= 0)[:, 0]
        order = torch.argsort(span[inside], stable=True)
        tokens, ids = inside[order], span[inside][order]
        present, counts = torch.unique_consecutive(ids, return_counts=True)
        labels = span_labels[present] if len(present) else span_labels[:0]
        labelled = (labels == 0) | (labels == 1)
        starts = torch.cumsum(counts, 0) - counts
        width = int(counts.max()) if len(counts) else 0
        grid = torch.full((len(present), width), len(span), dtype=torch.long, device=span.device)
        rows = torch.repeat_interleave(torch.arange(len(present), device=span.device), counts)
        grid[rows, torch.arange(len(tokens), device=span.device) - starts[rows]] = tokens
        self.grid, self.targets = grid[labelled], labels[labelled]

    def maxima(self, logits: torch.Tensor) -> torch.Tensor:
        """(S,) each labelled span's maximum logit (differentiable: the gradient reaches the maximum)."""
        padded = torch.cat([logits, logits.new_full((1,), float("-inf"))])
        return padded[self.grid].max(-1).values


def span_logits(logits: torch.Tensor, span: torch.Tensor, span_labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(each labelled span's maximum logit over its tokens, its label)."""
    grid = SpanGrid(span, span_labels)
    return grid.maxima(logits), grid.targets


def check_classes(labels: torch.Tensor) -> None:
    pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"probe training needs both classes: {pos} positive and {neg} negative tokens")


def fit_head(x: torch.Tensor, feats: TokenFeatures, config: ProbeTrainConfig) -> ProbeHead:
    """A head trained full batch on features x (N, dim) of ``feats``' tokens. Inputs are standardised
    (residual streams have a few huge dimensions that stall plain gradient descent); the scaling is
    folded back into the returned head, which reads raw hidden states."""
    check_classes(feats.labels)
    torch.manual_seed(config.seed)
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    linear = nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        linear.weight.normal_(0, 0.01)  # the reference initialisation
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=config.lr)
    anneal = max(1, int(config.anneal_fraction * config.steps))
    spans = SpanGrid(feats.span, feats.span_labels)
    for step in range(config.steps):
        omega = min(1.0, step / anneal)
        logits = linear(z).squeeze(-1)
        loss = probe_loss(logits, feats.labels, spans, omega, config.span_token_weight)
        loss = loss + config.l2 * linear.weight.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head = ProbeHead(x.shape[1])
    with torch.no_grad():
        w = linear.weight / std
        head.linear.weight.copy_(w)
        head.linear.bias.copy_(linear.bias - (w * mean).sum())
    return head.eval()


def _batches(examples: list[LabeledExample], batch_size: int, pad_id: int, rng: random.Random):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)


def train_probe(model: nn.Module, examples: list[LabeledExample], config: ProbeTrainConfig,
                pad_id: int, initial_head: ProbeHead | None = None) -> ProbeHead:
    """Train a head on block ``config.layer`` (and LoRA on blocks ≤ layer when ``config.lora`` is set).
    ``initial_head`` (LoRA only): start from this head — e.g. the frozen model's best — instead of a random one."""
    if config.lora is not None:
        return _train_lora_probe(model, examples, config, pad_id, initial_head)
    if initial_head is not None:
        raise ValueError("initial_head is for LoRA probes (a frozen probe's head is fit from scratch)")
    return sweep(model, examples, [config.layer], config, pad_id)[config.layer]


def _check_layers(model: nn.Module, layers: list[int]) -> None:
    n_blocks = model.config.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise IndexError(f"probe layers {bad} out of range for a model of {n_blocks} blocks")


def sweep(model: nn.Module, examples: list[LabeledExample], layers: list[int], config: ProbeTrainConfig,
          pad_id: int) -> dict[int, ProbeHead]:
    """One head per layer of a frozen model, all from the same stored features."""
    _check_layers(model, layers)
    if not examples:
        raise ValueError("no training examples")
    if config.lora is not None:
        raise ValueError("LoRA probes train one layer at a time (train_probe)")
    for p in model.parameters():
        p.requires_grad_(False)
    feats = extract(model, examples, layers, pad_id, (config.alignment,), progress=config.progress)
    heads = {}
    with progress_bar(len(layers), "probe heads", config.progress) as advance:
        for layer in layers:
            heads[layer] = fit_head(feats.features(layer, config.alignment), feats, config).to(
                next(model.parameters()).device)
            advance(1)
    return heads


def _train_lora_probe(model: nn.Module, examples: list[LabeledExample], config: ProbeTrainConfig,
                      pad_id: int, initial_head: ProbeHead | None = None) -> ProbeHead:
    _check_layers(model, [config.layer])
    if not examples:
        raise ValueError("no training examples")
    check_classes(torch.tensor([y for e in examples for y in e.labels]))
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    head = ProbeHead(hidden_size_of(model)).to(device)
    with torch.no_grad():
        if initial_head is not None:
            head.load_state_dict(initial_head.state_dict())
        else:
            head.linear.weight.normal_(0, 0.01)  # the reference initialisation
            head.linear.bias.zero_()
    lora = LoRAConfig(**{**config.lora.__dict__, "layers": list(range(config.layer + 1))})
    apply_lora(model, lora)
    groups = [{"params": list(head.parameters()), "lr": config.lr},
              {"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lora_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    batches = _batches(examples, min(config.batch_size, len(examples)), pad_id, random.Random(config.seed))
    model.train()
    anneal = max(1, int(config.anneal_fraction * config.steps))
    with progress_bar(config.steps, "LoRA probe", config.progress) as advance:
        for step in range(config.steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            out = model.forward_outputs(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        hidden_layers=[config.layer])
            logits = head(aligned_hidden(out.hidden_states[config.layer], config.alignment))  # tokens 1..
            spans = batch["span_ids"][:, 1:]
            offsets = torch.arange(spans.shape[0], device=device)[:, None] * batch["span_labels"].shape[1]
            grid = SpanGrid(torch.where(spans >= 0, spans + offsets, spans).flatten(), batch["span_labels"].flatten())
            loss = probe_loss(logits.flatten(), batch["labels"][:, 1:].flatten(), grid, min(1.0, step / anneal),
                              config.span_token_weight)
            loss = loss + config.l2 * head.linear.weight.pow(2).sum()
            if config.kl_weight:
                loss = loss + config.kl_weight * _kl_to_base(model, batch, out.logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            advance(1)
    model.eval()
    return head.eval()


def _kl_to_base(model: nn.Module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_probed) averaged over response tokens (labelled or inside a span)."""
    with torch.no_grad(), disabled(model):
        base = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    response = ((batch["labels"] != IGNORE) | (batch["span_ids"] >= 0))[:, 1:]  # predictions of tokens 1..
    log_p = torch.log_softmax(base[:, :-1].float(), -1)[response]
    log_q = torch.log_softmax(logits[:, :-1].float(), -1)[response]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
