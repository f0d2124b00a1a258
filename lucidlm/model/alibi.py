"""ALiBi (Press et al. 2022): no position embedding, a per-head linear penalty on distance.

Head h adds ``slope_h * (pos_k - pos_q)`` (≤ 0 for past keys) to its attention logits, so distant
tokens are attended less, at a rate that differs per head. Slopes form a geometric sequence
starting at 2^(-8/n); for head counts that are not powers of two the extra heads take every
other slope of the next power of two, as in the reference implementation.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The per-head slopes, shape (n_heads,)."""

    def geometric(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(closest)
    if closest != n_heads:
        slopes += geometric(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive attention bias, shape (batch, heads, q_len, k_len), from positions (batch, len)."""
    distance = (k_pos[:, None, :] - q_pos[:, :, None]).float()  # (batch, q, k), ≤ 0 for the past
    return slopes.to(distance.device)[None, :, None, None] * distance[:, None]
