"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small two-layer network after the attention output and after the feed-forward output of each block,
on the sublayer's output before the residual add (and before any norm that follows it):

    a(h) = h + W_up · f(W_down · h + b_down) + b_up        W_down: (m, d), W_up: (d, m), m ≪ d

The base model is frozen; each adapter trains 2·d·m + m + d parameters, plus — Houlsby's option — the
weights (and biases) of every norm. Houlsby (and google-research/adapter-bert) draws both matrices near
zero, N(0, 1e-3), so the adapter starts near the identity; here W_up and b_up start at exactly zero, so
training starts from the base model exactly, as LoRA's B = 0 does, and W_down starts as nn.Linear's
Kaiming-uniform draw (LoRA's A), so that W_up's gradient is not zero at the first step. f is GELU, as in
adapter-bert. Unlike LoRA's, the update is not linear, so it cannot be merged into a weight: it costs two
small products per sublayer at inference. It works position by position, so the KV cache, prefill and
decode need nothing new: ``Block`` calls ``attn_adapter`` / ``mlp_adapter`` when they are set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .mlp import ACTIVATIONS, activation_fn
from .norm import norm_parameters

PLACES = ("attn", "mlp")  # after the attention sublayer, after the feed-forward one (Pfeiffer et al. 2021: mlp only)


@dataclass
class BottleneckConfig:
    size: int = 64  # m, the bottleneck width (adapter-bert's default)
    activation: str = "gelu"
    places: tuple[str, ...] = PLACES
    layers: list[int] | None = None  # blocks to adapt (None: all)
    train_norms: bool = False  # Houlsby: the norms' weights train too

    def validate(self) -> None:
        """ValueError naming every bad field."""
        problems = []
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            problems.append(f"size must be an integer >= 1, got {self.size!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} unknown; choose from {sorted(ACTIVATIONS)}")
        unknown = [p for p in self.places if p not in PLACES]
        if unknown or not self.places or len(set(self.places)) != len(self.places):
            problems.append(f"places must be distinct names from {list(PLACES)}, got {list(self.places)}")
        if not isinstance(self.train_norms, bool):
            problems.append(f"train_norms must be true or false, got {self.train_norms!r}")
        if problems:
            raise ValueError("bad bottleneck adapter config: " + "; ".join(problems))


class BottleneckAdapter(nn.Module):
    """h + up(f(down(h))); ``up`` starts at zero, so the adapter starts as the identity."""

    def __init__(self, dim: int, size: int, activation: str = "gelu", device=None, dtype=None) -> None:
        super().__init__()
        self.act = activation_fn(activation)
        self.activation = activation
        self.down = nn.Linear(dim, size, device=device, dtype=dtype)  # weight (m, d): Kaiming-uniform
        self.up = nn.Linear(size, dim, device=device, dtype=dtype)  # weight (d, m)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        x = h.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(x))).to(h.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def _chosen_blocks(model: nn.Module, config: BottleneckConfig) -> list[int]:
    return list(range(len(model.blocks))) if config.layers is None else sorted(set(config.layers))


def check_config(model: nn.Module, config: BottleneckConfig) -> None:
    """Raise ValueError naming what is wrong with ``config`` for ``model``; touches nothing."""
    from .lora import lora_layers

    config.validate()
    n = len(getattr(model, "blocks", []))
    if n == 0:
        raise ValueError("bottleneck adapters go into a Transformer's blocks; this model has none")
    bad = [i for i in config.layers or [] if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad or config.layers == []:
        raise ValueError(f"bottleneck adapter layers {bad or '[]'} out of range for a model of {n} blocks")
    if any(True for _ in adapters(model)) or any(True for _ in lora_layers(model)):
        raise ValueError("the model already carries adapters (one adapter at a time)")


def expected_shapes(model: nn.Module, config: BottleneckConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``apply_bottleneck`` trains (the adapters', then the norms' if chosen)."""
    d, m = model.config.dim, config.size
    shapes = {}
    for i in _chosen_blocks(model, config):
        for place in config.places:
            prefix = f"blocks.{i}.{place}_adapter"
            shapes.update({f"{prefix}.down.weight": (m, d), f"{prefix}.down.bias": (m,),
                           f"{prefix}.up.weight": (d, m), f"{prefix}.up.bias": (d,)})
    if config.train_norms:
        shapes.update({name: tuple(p.shape) for name, p in norm_parameters(model).items()})
    return shapes


def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Add the adapters in place (the chosen places of the chosen blocks); freeze everything else
    (but the norms, with ``train_norms``)."""
    check_config(model, config)
    weight = model.embed.weight
    for p in model.parameters():
        p.requires_grad_(False)
    for i in _chosen_blocks(model, config):
        for place in config.places:
            adapter = BottleneckAdapter(model.config.dim, config.size, config.activation, weight.device, weight.dtype)
            setattr(model.blocks[i], f"{place}_adapter", adapter)
    if config.train_norms:
        for p in norm_parameters(model).values():
            p.requires_grad_(True)
    model.bottleneck_config = config
    return model


def adapters(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, BottleneckAdapter))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a bottleneck run trained: every adapter tensor, and the norms' with ``train_norms``."""
    config: BottleneckConfig | None = getattr(model, "bottleneck_config", None)
    if config is None:
        raise ValueError("the model has no bottleneck adapters (apply_bottleneck first)")
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in expected_shapes(model, config)}
