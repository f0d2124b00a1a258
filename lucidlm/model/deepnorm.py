"""DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers").

Post-norm (x_{l+1} = LN(x + G(x))) trains badly when deep: early updates move the model's output
a lot (the paper's §3), which pushes the LN inputs where their gradients vanish, and training
diverges or stalls unless warmed up slowly. DeepNorm keeps post-norm (and its quality) but

- up-weights the residual before the norm:  x_{l+1} = LN(α·x + G(x)), α > 1, and
- shrinks the sublayers' initial weights by β < 1: the FFN matrices and the attention's value and
  output projections get Xavier-normal with gain β; the query and key projections gain 1 (they only
  set where attention looks, not how much it writes).

With α and β chosen as below, the size of the model's update per step no longer grows with depth
(the paper's §4, for N layers = 2N residual sublayers).

The constants (the paper's Table 1; N encoder layers, M decoder layers):

    decoder-only (GPT-like)   α = (2N)^(1/4)             β = (8N)^(-1/4)
    encoder-only (BERT-like)  α = (2N)^(1/4)             β = (8N)^(-1/4)
    encoder-decoder           encoder α = 0.81·(N⁴M)^(1/16)   β = 0.87·(N⁴M)^(-1/16)
                              decoder α = (3M)^(1/4)          β = (12M)^(-1/4)

lucidlm's Transformer is decoder-only, so it uses the first row (``norm_placement="deepnorm"``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Attention
from .mlp import MLP


def deepnorm_alpha(n_layers: int) -> float:
    """The residual weight α = (2N)^(1/4) of a decoder-only stack of N layers."""
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    """The init gain β = (8N)^(-1/4) of a decoder-only stack of N layers."""
    return (8 * n_layers) ** -0.25


def encoder_decoder_constants(n_encoder: int, n_decoder: int) -> dict[str, tuple[float, float]]:
    """(α, β) for each side of an encoder-decoder (Table 1), kept for reference: lucidlm's
    encoder-decoder (model/encoder_decoder.py) is the original post-/pre-norm Transformer."""
    nm = n_encoder**4 * n_decoder
    return {"encoder": (0.81 * nm ** (1 / 16), 0.87 * nm ** (-1 / 16)),
            "decoder": ((3 * n_decoder) ** 0.25, (12 * n_decoder) ** -0.25)}


def xavier_normal_std(weight: torch.Tensor, gain: float) -> float:
    """The std of nn.init.xavier_normal_ on a Linear weight (out, in): gain·√(2 / (in + out))."""
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def deepnorm_init_(blocks: nn.ModuleList, n_layers: int, generator: torch.Generator | None = None) -> None:
    """Re-initialise every block's attention and feed-forward matrices as the paper's Figure 2 does:
    q, k Xavier-normal with gain 1; v, out and the FFN's (gate, up, down; every expert's in an MoE)
    with gain β. Biases, norms, embeddings, the router and the head keep the ordinary init."""
    beta = deepnorm_beta(n_layers)
    for block in blocks:
        attn = block.attn
        if not isinstance(attn, Attention):  # the config refuses MLA with deepnorm: this is a guard
            raise TypeError(f"DeepNorm's init needs q/k/v/o projections, got {type(attn).__name__}")
        gains = [(attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, beta), (attn.o_proj, beta)]
        for ffn in block.mlp.modules():  # the MLP itself, or an MoE's experts and shared experts
            if isinstance(ffn, MLP):
                gains += [(ffn.up_proj, beta), (ffn.down_proj, beta)]
                if ffn.gated:
                    gains.append((ffn.gate_proj, beta))
        with torch.no_grad():
            for linear, gain in gains:
                linear.weight.normal_(0.0, xavier_normal_std(linear.weight, gain), generator=generator)
