"""LoRA (Hu et al. 2021): a frozen weight W plus a trainable low-rank update, y = W x + (α/r) · B A x.

A (r × in) starts random (Kaiming-uniform, as PEFT), B (out × r) at zero, so training starts from
the base model exactly. Only A and B train: r·(in + out) parameters per wrapped layer instead of
in·out. ``merge`` folds B A · α/r into W for inference at the base model's speed; ``unmerge`` takes
it back out. ``disabled(model)`` runs the base model alone — the reference policy for DPO and the
base distribution for the probe's KL term, with no second copy of the weights.

``modules_to_save`` (PEFT's name) trains whole modules beside the adapters: LongLoRA (Chen et al. 2023) trains
the embedding and every norm (``longlora_modules``), a few parameters that long-context fine-tuning needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .cpu_kernels import is_packed, pack_weight
from .linear import Linear
from .norm import RMSNorm

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # Linear layers by name, or by a dotted tail of their path as PEFT matches (attn.q_proj, blocks.0.attn.q_proj)
    target_modules: tuple[str, ...] = TARGETS
    layers: list[int] | None = None  # blocks to adapt (None: all)
    use_rslora: bool = False  # scale α/√r instead of α/r (Kalajdzievski 2023)
    # embeddings, norms or lm_head trained in full (by path or dotted tail, as targets); their weights are kept
    # whole in the adapter (PEFT's modules_to_save)
    modules_to_save: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """α/r, or α/√r (rsLoRA: keeps the update's size stable as r grows)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoRALinear(nn.Module):
    """``base_layer`` (frozen) + ``lora_B(lora_A(dropout(x))) · scaling``; parameter names as PEFT's."""

    def __init__(self, base: Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        device, dtype = base.weight.device, base.weight.dtype
        # Created in PEFT's order (A, B, then A re-drawn), so one seed gives PEFT's A exactly.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta(self) -> torch.Tensor:
        """(out, in): the update B A · scaling."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged and self.disabled:
            raise RuntimeError("a merged LoRA layer cannot be disabled; unmerge it first (disabled() does)")
        if self.merged or self.disabled:
            return y
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_to_base(self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self.delta())
            self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        # The in-place add bumps the weight's version, which marks a oneDNN-packed copy stale (the
        # base then runs plain F.linear, correctly); re-packing keeps a packed model at packed speed.
        packed = is_packed(self.base_layer.weight)
        self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        if packed:
            pack_weight(self.base_layer.weight)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None


def check_config(model: nn.Module, config: LoRAConfig) -> None:
    """Raise ValueError naming what is wrong with ``config`` for ``model``; touches nothing."""
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {config.r!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {config.dropout}")
    unknown = sorted(t for t in set(config.target_modules) if t.rsplit(".", 1)[-1] not in TARGETS)
    if unknown or not config.target_modules:
        raise ValueError(f"unknown LoRA target modules {unknown or '[]'}; choose from {list(TARGETS)}")
    n = len(getattr(model, "blocks", []))
    bad = [i for i in config.layers or [] if not 0 <= i < n]
    if bad:
        raise ValueError(f"LoRA layers {bad} out of range for a model of {n} blocks")
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already carries LoRA layers (one adapter at a time)")
    saved_modules(model, config)
    if getattr(model, "bottleneck_config", None) is not None:
        raise ValueError("the model already carries bottleneck adapters (one adapter at a time)")


def savable_modules(model: nn.Module) -> list[str]:
    """The modules ``modules_to_save`` may name: the embedding, the norms and lm_head."""
    return [name for name, m in model.named_modules()
            if name in ("embed", "lm_head") or isinstance(m, RMSNorm | nn.LayerNorm)]


def saved_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the modules ``config.modules_to_save`` trains in full; ValueError naming an entry that matches no
    embedding, norm or lm_head, or one whose weight is also the other end of tied embeddings."""
    names = savable_modules(model)
    chosen = []
    for entry in config.modules_to_save:
        hits = [name for name in names if targeted(name, (entry,))]
        if not hits:
            raise ValueError(f"LoRA modules_to_save entry {entry!r} names no embedding, norm or lm_head of the model")
        chosen += [name for name in hits if name not in chosen]
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_embeddings", False) and {"embed", "lm_head"} & set(chosen):
        raise ValueError("LoRA modules_to_save: this model ties its embedding to lm_head (tie_embeddings), so "
                         "training one also changes the other, which a PEFT adapter does not express; save the "
                         "norms only")
    return chosen


def longlora_modules(model: nn.Module) -> tuple[str, ...]:
    """LongLoRA's trainable extras: the token embedding and every norm, by path."""
    return tuple(name for name, m in model.named_modules()
                 if name == "embed" or isinstance(m, RMSNorm | nn.LayerNorm))


def targeted(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule: a target is the module's path or a dotted tail of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the Linear layers ``apply_lora`` wraps (checked config; the model is not touched)."""
    check_config(model, config)
    names = [name for name, m in model.named_modules()
             if isinstance(m, Linear) and targeted(name, config.target_modules)
             and (config.layers is None or _block_index(name) in config.layers)]
    if not names:
        raise ValueError(f"no Linear layer named {list(config.target_modules)} in the chosen blocks")
    return names


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the chosen Linear layers of the chosen blocks in place; freeze everything else."""
    targets = [(name, model.get_submodule(name)) for name in lora_targets(model, config)]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in targets:
        parent_name, child = name.rsplit(".", 1)
        layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora)
        setattr(model.get_submodule(parent_name), child, layer)
    for name in saved_modules(model, config):
        model.get_submodule(name).requires_grad_(True)
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every A and B weight (what an optimizer of a LoRA run gets)."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: ``<layer>.lora_A.weight`` and ``<layer>.lora_B.weight`` per wrapped layer."""
    return {f"{n}.{ab}.weight": getattr(m, ab).weight.detach()
            for n, m in lora_layers(model) for ab in ("lora_A", "lora_B")}


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.merge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's ``merge_and_unload``: fold every B A · scaling into its base weight and put the plain layer back, so
    the model is an ordinary one again (saved, loaded or fine-tuned further like any checkpoint). The
    modules_to_save were trained in place and stay as they are."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every LoRA update switched off inside the block (merged layers are
    unmerged for its duration, as PEFT's ``disable_adapter`` does, and merged again after)."""
    if getattr(getattr(model, "lora_config", None), "modules_to_save", ()):
        raise ValueError("the LoRA adapter trains modules_to_save in place, so switching the adapters off does not "
                         "give the base model back (PEFT keeps a copy); load the base model instead")
    layers = [m for _, m in lora_layers(model)]
    merged = [m for m in layers if m.merged]
    for m in merged:
        m.unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False
        for m in merged:
            m.merge()
