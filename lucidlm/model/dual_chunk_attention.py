"""Dual chunk attention (DCA; An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models").

A RoPE model trained on c tokens has only seen relative positions 0..c-1; beyond them its attention
breaks down. DCA cuts the sequence into chunks of s tokens (s < c) and computes every query-key score
with positions whose difference stays in the trained range. With w = c - s (the local window):

    keys                                     P_k   = position mod s            (0..s-1 in every chunk)
    key in the query's chunk   (intra)       P_q   = position mod s            distance = the true one, < s
    key in the previous chunk  (successive)  P_q   = min(s + position mod s, c - 1)
                                                   the true distance for the chunk's first w queries, capped after
    key in an earlier chunk    (inter)       P_q   = c - 1                     distance c-1-P_k in [w, c-1]: "far"

The score of query i and key j uses P_q(region of i, j)[i] - P_k[j] (the paper's matrix M); one softmax
runs over all keys. Chunks are counted from position ids (not sequence indices), so padding and a KV
cache (whose keys carry their position ids) work unchanged. A sequence shorter than one chunk sees only
the intra region, i.e. ordinary attention.

How it is computed: keys depend only on their own position, so they are rotated once by P_k and cached as
usual. Because P_q^intra = P_k, ``DualChunkRope`` unpacks as that (cos, sin) table and the ordinary attention
code rotates q and k with it. A query's successive and inter positions differ from its intra one by a fixed
offset, so ``dual_chunk_attend`` rotates the rotated query further by that offset (rotations add) and picks,
per (query, key) pair, the score of the region the pair lies in — three score matrices instead of one, the
same O(N²) memory as the ordinary masked attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DualChunkConfig
from .rope import RotaryEmbedding, apply_rope

INTRA, SUCCESSIVE, INTER = 0, 1, 2  # the region of a (query, key) pair: same, previous, earlier chunk


@dataclass
class QueryPositions:
    """The position indices of one forward's tokens (batch, seq): the paper's P_k and three P_q."""

    key: torch.Tensor  # = intra
    successive: torch.Tensor
    inter: torch.Tensor


def position_indices(positions: torch.Tensor, cfg: DualChunkConfig) -> QueryPositions:
    """P_k = P_q^intra, P_q^succ and P_q^inter of tokens at these position ids (batch, seq)."""
    s, largest = cfg.chunk_size, cfg.chunk_size + cfg.local_window - 1  # c - 1
    in_chunk = positions % s
    return QueryPositions(key=in_chunk, successive=(s + in_chunk).clamp(max=largest),
                          inter=torch.full_like(in_chunk, largest))


def regions(q_positions: torch.Tensor, k_positions: torch.Tensor, cfg: DualChunkConfig) -> torch.Tensor:
    """(batch, q, k): INTRA, SUCCESSIVE or INTER by how many chunks the key lies before the query
    (future keys count as INTRA; causal masking removes them)."""
    s = cfg.chunk_size
    apart = q_positions[:, :, None] // s - k_positions[:, None, :] // s
    return apart.clamp(INTRA, INTER)


def relative_positions(q_positions: torch.Tensor, k_positions: torch.Tensor, cfg: DualChunkConfig) -> torch.Tensor:
    """The paper's relative-position matrix M (batch, q, k): P_q of the pair's region minus P_k of the key."""
    q, k = position_indices(q_positions, cfg), position_indices(k_positions, cfg).key
    region = regions(q_positions, k_positions, cfg)
    query = torch.where(region == INTRA, q.key[:, :, None], q.successive[:, :, None])
    query = torch.where(region == INTER, q.inter[:, :, None], query)
    return query - k[:, None, :]


@dataclass
class DualChunkRope:
    """The rotations of one forward. Iterates as the (cos, sin) of P_k = P_q^intra, which the ordinary attention
    code applies to q and k; ``successive`` / ``inter`` rotate an intra-rotated query on to its other positions;
    ``region`` says which of the three each (query, key) pair uses."""

    cos: torch.Tensor  # (batch, q, dim/2)
    sin: torch.Tensor
    successive: tuple[torch.Tensor, torch.Tensor]  # rotation by P_q^succ - P_q^intra, (batch, q, dim/2) each
    inter: tuple[torch.Tensor, torch.Tensor]  # rotation by P_q^inter - P_q^intra
    region: torch.Tensor  # (batch, 1, q, k)

    def __iter__(self):
        return iter((self.cos, self.sin))


def dual_chunk_rope(rotary: RotaryEmbedding, q_positions: torch.Tensor, k_positions: torch.Tensor,
                    cfg: DualChunkConfig, dtype: torch.dtype) -> DualChunkRope:
    """The tables for queries at ``q_positions`` (batch, q) attending to keys at ``k_positions`` (batch, k)."""
    p = position_indices(q_positions, cfg)
    cos, sin = rotary(p.key, dtype)

    def rotation(offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = rotary(offset, torch.float32)  # a pure rotation: undo a scaled RoPE's cos/sin multiplier (YaRN)
        return (c / rotary.attention_factor).to(dtype), (s / rotary.attention_factor).to(dtype)

    return DualChunkRope(cos, sin, rotation(p.successive - p.key), rotation(p.inter - p.key),
                         regions(q_positions, k_positions, cfg)[:, None])


def dual_chunk_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                      rope: DualChunkRope, interleaved: bool = False) -> torch.Tensor:
    """softmax over all keys of the score each pair's region gives, times v.

    q: (batch, heads, q, d) rotated by P_q^intra; k, v: (batch, kv_heads, k, d) with k rotated by P_k;
    mask: bool (batch, 1, q, k), True = attend. Scores and softmax in float32.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def scores(query: torch.Tensor) -> torch.Tensor:
        return (query @ k.transpose(-1, -2)).float() * scale  # (batch, heads, q, k)

    logits = scores(q)
    logits = torch.where(rope.region == SUCCESSIVE, scores(apply_rope(q, *rope.successive, interleaved)), logits)
    logits = torch.where(rope.region == INTER, scores(apply_rope(q, *rope.inter, interleaved)), logits)
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(torch.float32).min)
    return logits.softmax(-1).to(v.dtype) @ v
