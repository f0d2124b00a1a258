"""Fusing sibling projections of a quantized model: attention's q, k and v, and a gated MLP's gate and up, read the
same input, so their weights stacked row after row are one layer, and one kernel call computes all three (two).

Why: a decode step at batch 1 multiplies each weight by one vector, and a small layer's call costs more than its
bytes (dispatch, the threads' fork and join, a cold start of the weights' stream). SmolLM2-135M's k and v are
192x576: 55 KB of 4-bit weights each, read at 2-3 GB/s alone; stacked with q (960x576) at about 7 GB/s. 210 kernel
calls per token become 120.

Only quantized layers whose stored integers and scales are laid out row by row (lucidlm's kernels, torch's int8
kernel) are fused; float layers keep their own products (oneDNN's and inductor's already read them at the
bandwidth), and LoRA-wrapped layers stay separate. The fused layer's output is split back, so the model computes
exactly what it computed before (rows are independent in these kernels; a test checks it bit for bit).
"""

from __future__ import annotations

from torch import nn

from .quantized_linear import QuantizedLinear

# fused layer -> the layers it replaces, in the order of its output rows (attention.py / mlp.py split it so)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_projections(model: nn.Module) -> int:
    """Stack every attention's q/k/v and gated MLP's gate/up that are quantized alike into one layer; returns how
    many fused layers were made."""
    made = 0
    for module in list(model.modules()):  # listed first: the loop replaces children
        for fused, parts in FUSED.items():
            if getattr(module, fused, False) is not None:  # not a fusing module, or fused already
                continue
            layers = [getattr(module, p, None) for p in parts]
            if not stackable(layers):
                continue
            setattr(module, fused, QuantizedLinear.stacked(layers))
            for p in parts:
                delattr(module, p)
            made += 1
    return made


def stackable(layers: list[nn.Module | None]) -> bool:
    """Quantized the same way, reading the same inputs, stored row by row, biases all or none."""
    if not all(isinstance(m, QuantizedLinear) for m in layers):
        return False
    first = layers[0]
    alike = all(m.scheme == first.scheme and m.kernel == first.kernel and m.in_features == first.in_features
                and (m.bias is None) == (first.bias is None) for m in layers)
    return alike and first.rows_in_order

