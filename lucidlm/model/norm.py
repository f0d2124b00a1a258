"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016).

RMSNorm drops LayerNorm's mean subtraction and bias: x / rms(x) * w. It is computed in float32
and cast back, as the reference implementations do, so bf16/fp16 models do not lose precision
in the sum of squares. ``unit_offset`` scales by (1 + w) as Gemma stores its weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma multiplies in float32 before casting back
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (mean and variance over the last dim, affine weight and optional bias)."""


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm the config asks for, over ``dim`` channels (default: the model width)."""
    dim = dim or cfg.dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset)
    return LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every norm's weight (and bias), by parameter name: what Houlsby adapters and LongLoRA also train."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, RMSNorm | nn.LayerNorm)
            for p_name, p in m.named_parameters(recurse=False)}
