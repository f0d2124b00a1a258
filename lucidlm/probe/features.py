"""What a frozen model says about every response token, from one forward per conversation.

A linear probe on a frozen model needs the model only to compute hidden states: extracting them once
and training heads on the stored features makes a layer sweep and a choice of regularisation cost
seconds instead of a forward pass per optimiser step. The same forward gives the token-level baselines
(token NLL and the entropy of the distribution that produced the token), so every method is scored
on exactly the same tokens.

Kept tokens: response tokens (labelled 0/1 or inside a span), never position 0. For token t the
feature is h_L[t] ("own" alignment) or h_L[t − 1] ("predictive"); NLL and entropy always come from the
distribution predicting t (logits at t − 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.lora import disabled
from ..progress import progress_bar
from .data import IGNORE, LabeledExample, collate
from .probe import ALIGNMENTS


@dataclass
class TokenFeatures:
    """N kept tokens of a set of examples, S labelled spans."""

    hidden: dict[str, dict[int, torch.Tensor]]  # alignment -> layer -> (N, dim), stored in ``dtype``
    labels: torch.Tensor  # (N,) 1 hallucinated, 0 supported / outside spans, −100 ignored
    span: torch.Tensor  # (N,) index into the spans below, −1 outside every span
    example: torch.Tensor  # (N,) index of the example the token belongs to
    nll: torch.Tensor  # (N,) −log p(token) under the base model
    entropy: torch.Tensor  # (N,) entropy of the base model's distribution that produced the token
    span_labels: torch.Tensor  # (S,) 1, 0 or −100
    span_example: torch.Tensor  # (S,) example of each span
    span_index: torch.Tensor  # (S,) position of the span among its example's annotations
    lora_kl: float | None = None  # a LoRA model: mean KL(base ‖ adapted) over response tokens

    def features(self, layer: int, alignment: str = "own") -> torch.Tensor:
        return self.hidden[alignment][layer]


@torch.no_grad()
def extract(model: nn.Module, examples: list[LabeledExample], layers: list[int], pad_id: int,
            alignments: tuple[str, ...] = ("own",), batch_size: int = 16, dtype: torch.dtype = torch.float32,
            progress: bool | None = None, base_baselines: bool = True) -> TokenFeatures:
    """One forward per batch (examples sorted by length to pad little) over ``examples``. ``base_baselines``: on
    a model with LoRA layers, NLL and entropy from the model with its adapters off (a LoRA probe's base model);
    False: from the model as it is (the adapter is the model being measured, e.g. a LoRA RL run's)."""
    if not examples:
        raise ValueError("no examples to extract features from")
    bad = [a for a in alignments if a not in ALIGNMENTS]
    if bad:
        raise ValueError(f"unknown alignments {bad}; choose from {list(ALIGNMENTS)}")
    device = next(model.parameters()).device
    adapted = base_baselines and getattr(model, "lora_config", None) is not None
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("labels", "span", "example", "nll", "entropy")}
    hidden: dict[str, dict[int, list]] = {a: {layer: [] for layer in layers} for a in alignments}
    kl_sum, kl_n = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    span_offset = _span_offsets(examples)
    with progress_bar(len(examples), "features", progress) as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            out = model.forward_outputs(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        hidden_layers=layers)
            base = out.logits
            if adapted:  # baselines are the base model's: the model a user runs without the probe
                with disabled(model):
                    base = model(batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = _kept(batch)  # (b, s - 1): tokens 1.. that are scored
            logp = torch.log_softmax(base[:, :-1].float(), -1)[keep]  # distributions predicting kept tokens
            targets = batch["input_ids"][:, 1:][keep]
            parts["nll"].append(-logp.gather(-1, targets[:, None])[:, 0].cpu())
            parts["entropy"].append(-(logp.exp() * logp).sum(-1).cpu())
            if adapted:
                log_q = torch.log_softmax(out.logits[:, :-1].float(), -1)[keep]
                kl_sum += float((logp.exp() * (logp - log_q)).sum())
                kl_n += int(keep.sum())
            rows = torch.tensor(idx, device=device)[:, None].expand_as(keep)[keep]
            spans = batch["span_ids"][:, 1:][keep]
            offsets = span_offset.to(device)[rows]
            parts["span"].append(torch.where(spans >= 0, spans + offsets, spans).cpu())
            parts["labels"].append(batch["labels"][:, 1:][keep].cpu())
            parts["example"].append(rows.cpu())
            for alignment in alignments:
                for layer in layers:
                    h = out.hidden_states[layer]
                    h = h[:, 1:] if alignment == "own" else h[:, :-1]
                    hidden[alignment][layer].append(h[keep].to(dtype).cpu())
            advance(len(idx))
    span_labels = [torch.tensor(e.span_labels, dtype=torch.long) for e in examples]
    return TokenFeatures(
        hidden={a: {layer: torch.cat(v) for layer, v in per.items()} for a, per in hidden.items()},
        **{k: torch.cat(v) for k, v in parts.items()},
        span_labels=torch.cat(span_labels) if span_labels else torch.zeros(0, dtype=torch.long),
        span_example=torch.cat([torch.full((len(e.span_labels),), i) for i, e in enumerate(examples)]),
        span_index=torch.cat([torch.arange(len(e.span_labels)) for e in examples]),
        lora_kl=kl_sum / max(kl_n, 1) if adapted else None,
    )


def _kept(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels, spans = batch["labels"][:, 1:], batch["span_ids"][:, 1:]
    return (labels != IGNORE) | (spans >= 0)


def _span_offsets(examples: list[LabeledExample]) -> torch.Tensor:
    counts = torch.tensor([len(e.span_labels) for e in examples])
    return torch.cumsum(counts, 0) - counts


def span_max(token_values: torch.Tensor, span: torch.Tensor, n_spans: int) -> torch.Tensor:
    """(N,) per-token values -> (S,) each span's maximum over its tokens (−inf for a span with no token)."""
    out = torch.full((n_spans,), float("-inf"), dtype=token_values.dtype)
    inside = span >= 0
    return out.scatter_reduce(0, span[inside], token_values[inside], reduce="amax", include_self=True)
