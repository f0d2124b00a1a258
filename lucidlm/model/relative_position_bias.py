"""T5's relative position bias (Raffel et al. 2020, §2.1): a learned scalar per head and distance bucket.

No position embedding enters the residual stream. Instead each attention logit q_i·k_j gets a bias
b[h, bucket(j − i)] read from a table of (num_buckets, n_heads) learned numbers, so a head can learn
to prefer near or far keys. Distances are bucketed (Mesh TensorFlow's scheme, which transformers'
``T5Attention._relative_position_bucket`` copies):

- half of the buckets are exact distances 0, 1, ..., max_exact − 1;
- the other half cover max_exact .. max_distance logarithmically; every distance ≥ max_distance shares
  the last bucket, so the bias generalises to sequences longer than any seen in training;
- bidirectional (an encoder): keys after the query (j > i) get their own half of the buckets;
  causal (a decoder): only keys at or before the query exist, later ones all fall in bucket 0.

T5 computes the bias once, in its first layer, and every layer adds the same tensor; here the
``Transformer`` holds the one table and hands the bias to every block (as it does ALiBi's). T5 also
does not scale q·k by 1/sqrt(d): ``ModelConfig.attn_scale=1.0`` says so.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor,  # key position − query position, any integer shape
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """The bucket in [0, num_buckets) of each relative position (same shape, long)."""
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:  # the upper half of the buckets is for keys after the query
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:  # keys after the query are not attended: they share bucket 0 with distance 0
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced buckets from max_exact to max_distance, in float32 whatever the model's dtype (the boundaries
    # must not move with precision); clamped below so that log(0) is never taken for the exact distances
    scaled = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """The learned (num_buckets, n_heads) table and the bias it gives for given query and key positions."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.table = nn.Embedding(num_buckets, n_heads)  # T5's relative_attention_bias

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Additive attention bias (batch, heads, q_len, k_len) from position ids q_pos (batch, q_len) and
        k_pos (batch, k_len): position ids, not sequence indices, so left padding does not count as distance."""
        relative = k_pos[:, None, :] - q_pos[:, :, None]  # (batch, q, k)
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.table(buckets).permute(0, 3, 1, 2)  # (batch, q, k, heads) -> (batch, heads, q, k)

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"
