"""Rotary position embedding (RoPE, Su et al. 2021) and its context-extension variants.

RoPE rotates each pair of channels of q and k by an angle ``position * inv_freq[i]``; the dot
product q·k then depends only on the relative offset of the two positions. Extending the context
means changing ``inv_freq``:

- ``linear`` (position interpolation, Chen et al. 2023): divide every frequency by ``factor``.
- ``ntk`` (NTK-aware, bloc97): raise the base so low frequencies stretch, high ones barely move.
- ``dynamic``: NTK with the base recomputed from the current sequence length.
- ``ntk_by_parts`` (bloc97; YaRN paper §3.2): per channel, by how many turns ``r = L/λ`` it makes over
  the trained length L: interpolate those with r < α, keep those with r > β, ramp linearly in r between.
- ``yarn`` (Peng et al. 2023): interpolate low-frequency bands, keep high-frequency ones, ramp in
  between, and scale the attention logits by ``0.1*ln(factor)+1`` (applied to cos and sin).
- ``llama3``: Llama-3.1's smooth version of the same band split.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import RopeScaling


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/dim) for i in [0, dim/2): the unscaled RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1*mscale*ln(factor)+1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    original = s.original_max_seq_len

    def correction_dim(n_rotations: float) -> float:
        # the channel whose wavelength makes n_rotations full turns over the original context
        return dim * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency, unchanged), 0: interpolate (divide by factor)
    inv = base_inv_freq(dim, theta)
    return inv / s.factor * (1 - keep) + inv * keep


def _ntk_by_parts_inv_freq(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """h(θ_d) = (1 − γ(r_d))·θ_d/factor + γ(r_d)·θ_d with r_d = L/λ_d (Peng et al. 2023, eq. 16-18).

    λ_d = 2π/θ_d is channel d's wavelength and L the trained context; γ(r) = 0 below α = ``beta_slow``
    (the channel never turned once in training: interpolate), 1 above β = ``beta_fast`` (it turned many
    times: keep), linear in r between. YaRN ramps linearly in the channel index d instead, and adds a
    temperature."""
    inv = base_inv_freq(dim, theta)
    turns = s.original_max_seq_len * inv / (2 * math.pi)  # r_d = L / λ_d
    gamma = ((turns - s.beta_slow) / (s.beta_fast - s.beta_slow)).clamp(0, 1)
    return (1 - gamma) * inv / s.factor + gamma * inv


def _llama3_inv_freq(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    inv = base_inv_freq(dim, theta)
    original = s.original_max_seq_len
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(dim: int, theta: float, s: RopeScaling, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Frequencies and the cos/sin multiplier for a scaling variant.

    ``seq_len`` is only used by ``dynamic``: the length the frequencies must cover now.
    """
    kind = s.type
    if kind == "default" or (kind in ("linear", "ntk") and s.factor == 1.0):
        return base_inv_freq(dim, theta), 1.0
    if kind == "linear":
        return base_inv_freq(dim, theta) / s.factor, 1.0
    if kind == "ntk":
        return base_inv_freq(dim, theta * s.factor ** (dim / (dim - 2))), 1.0
    if kind == "dynamic":
        original = s.original_max_seq_len
        n = max(seq_len or original, original)
        new_theta = theta * ((s.factor * n / original) - (s.factor - 1)) ** (dim / (dim - 2))
        return base_inv_freq(dim, new_theta), 1.0
    if kind == "yarn":
        if s.attention_factor is not None:
            att = s.attention_factor
        elif s.mscale and s.mscale_all_dim:
            att = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
        else:
            att = yarn_mscale(s.factor)
        return _yarn_inv_freq(dim, theta, s), att
    if kind == "llama3":
        return _llama3_inv_freq(dim, theta, s), 1.0
    if kind == "ntk_by_parts":
        return _ntk_by_parts_inv_freq(dim, theta, s), 1.0
    raise ValueError(f"unknown RoPE scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables every attention layer shares."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling, max_seq_len: int) -> None:
        super().__init__()
        if scaling.type != "default" and scaling.original_max_seq_len is None:
            scaling = dataclasses.replace(scaling, original_max_seq_len=max_seq_len)  # never mutate the config
        self.dim, self.theta, self.scaling = dim, theta, scaling
        inv_freq, self.attention_factor = rope_inv_freq(dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (batch, seq) -> cos, sin: (batch, seq, dim/2), computed in float32
        inv_freq = self.inv_freq
        if self.scaling.type == "dynamic":
            longest = int(position_ids.max()) + 1
            if longest > self.scaling.original_max_seq_len:
                inv_freq, _ = rope_inv_freq(self.dim, self.theta, self.scaling, longest)
                inv_freq = inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * inv_freq.float()
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate channel pairs of x: (batch, heads, seq, dim) by cos/sin: (batch, seq, dim/2).

    Pairs are (i, i + dim/2) in the "half" layout (Llama/GPT-NeoX) and (2i, 2i+1) in the
    interleaved layout of the original paper (used by DeepSeek checkpoints).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
