"""Position-wise feed-forward networks.

Plain: down(act(up(x))) as in the original Transformer and GPT-2 (GELU) or ReLU.
Gated (GLU family, Shazeer 2020): down(act(gate(x)) * up(x)); SiLU gives SwiGLU (Llama, Qwen,
Mistral), tanh-GELU gives GeGLU (Gemma). The gate adds a third matrix, so gated models use a
smaller hidden width (~8/3·dim instead of 4·dim) for the same parameter count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Activation, ModelConfig
from .linear import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: Activation):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or cfg.ffn_dim
        self.gated = cfg.gated_mlp
        self.act = activation_fn(cfg.activation)
        if self.gated:
            self.gate_proj = Linear(cfg.dim, hidden, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.dim, hidden, bias=cfg.mlp_bias)
        self.down_proj = Linear(hidden, cfg.dim, bias=cfg.mlp_bias)
        # gate and up as one quantized layer (model/fused_projections.py: one kernel call instead of two)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(self.act(gate) * up)
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
