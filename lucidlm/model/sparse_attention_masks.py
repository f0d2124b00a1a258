"""Sparse attention patterns as boolean masks: local + global (Longformer) and block-sparse (BigBird).

Full attention scores every (query, key) pair: O(N²). A sparse pattern fixes in advance which pairs are
scored, so that each query sees O(window + globals) keys instead of N:

- local + global (Longformer, Beltagy et al. 2020): a sliding window over the ``window`` nearest positions
  (causal: the ``window`` before the query, itself included — the rule of ``masks.py``'s sliding window;
  bidirectional: both sides) plus a few *global* positions (the first ``global_tokens``) that every query
  sees and that see every key;
- block-sparse (BigBird, Zaheer et al. 2020): positions grouped into blocks of ``block_size``, and a boolean
  *layout* over (query block, key block) says which blocks are scored: a window of neighbouring blocks,
  global blocks and a few random blocks per row (``bigbird_layout``), or any layout the caller chooses.

Masks here are True = may attend, shape (batch, 1, q_len, k_len), built from *position ids* (so left padding
does not shift the pattern) and combined with ``&`` with the causal/padding mask of ``masks.py``. Every pattern
keeps a query's own position, so the combination never leaves a row empty.

This is the pattern, not a sparse kernel: through ``attend`` (SDPA with a boolean mask) the full N×N scores
and the N×N mask are still materialised; the pattern says which scores *matter*, and a block-sparse kernel
(FlashAttention's block-sparse mode, Triton's) is what would skip the others.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import ModelConfig, SparseAttentionConfig


def local_global_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, global_tokens: int,
                      causal: bool = True) -> torch.Tensor:
    """Longformer's pattern: positions within ``window`` of the query, or a global position (< global_tokens) on
    either side. q_pos: (batch, q_len), k_pos: (batch, k_len) -> (batch, 1, q_len, k_len)."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    distance = q - k
    near = (distance >= 0) & (distance < window) if causal else distance.abs() < window
    allowed = near | (k < global_tokens) | (q < global_tokens)
    return allowed & (k <= q) if causal else allowed


def bigbird_layout(n_blocks: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int = 0,
                   causal: bool = True) -> torch.Tensor:
    """BigBird's block layout (n_blocks, n_blocks), True = query block attends to key block.

    Window: key blocks within ``window_blocks`` of the query block (itself included); global: the first
    ``global_blocks`` blocks as keys of every block and as queries of all; random: ``random_blocks`` more key
    blocks per query block, drawn without replacement from those not yet chosen (earlier ones only, when causal)
    with a generator seeded by ``seed`` — row by row, so a row does not depend on ``n_blocks`` when causal.
    """
    qb, kb = torch.arange(n_blocks)[:, None], torch.arange(n_blocks)[None, :]
    distance = qb - kb
    near = (distance >= 0) & (distance < window_blocks) if causal else distance.abs() < window_blocks
    layout = near | (kb < global_blocks) | (qb < global_blocks)
    if causal:
        layout &= kb <= qb
    generator = torch.Generator().manual_seed(seed)
    for row in range(n_blocks):
        candidates = (~layout[row]).nonzero().flatten()
        if causal:
            candidates = candidates[candidates < row]
        picked = candidates[torch.randperm(len(candidates), generator=generator)[:random_blocks]]
        layout[row, picked] = True
    return layout


def block_sparse_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int, layout: torch.Tensor,
                      causal: bool = True) -> torch.Tensor:
    """Query at position p may see key at position r when ``layout[p // block_size, r // block_size]`` (and r ≤ p
    when causal). layout: (q_blocks, k_blocks) bool covering every position given. -> (batch, 1, q_len, k_len)."""
    q_block, k_block = q_pos // block_size, k_pos // block_size  # (b, q), (b, k)
    n_q, n_k = layout.shape
    if int(q_block.max()) >= n_q or int(k_block.max()) >= n_k:
        raise ValueError(f"positions up to {int(max(q_pos.max(), k_pos.max()))} need more blocks of {block_size} "
                         f"than the layout's {n_q} x {n_k}")
    layout = layout.to(q_pos.device)
    allowed = layout[q_block[:, :, None], k_block[:, None, :]][:, None]  # (b, 1, q, k)
    return allowed & (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) if causal else allowed


@functools.lru_cache(maxsize=8)
def _layout_for(sparse: tuple, n_blocks: int) -> torch.Tensor:
    cfg = SparseAttentionConfig(*sparse)
    return bigbird_layout(n_blocks, cfg.window_blocks, cfg.global_blocks, cfg.random_blocks, cfg.seed)


def sparse_pattern_mask(cfg: ModelConfig, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The causal pattern ``cfg.sparse_attention`` names, for queries and keys at these positions; a block
    layout covers ``max_seq_len`` (drawn once per config, so every forward and the KV cache see the same)."""
    sparse = cfg.sparse_attention
    if sparse.pattern == "local_global":
        return local_global_mask(q_pos, k_pos, sparse.window, sparse.global_tokens)
    n_blocks = -(-cfg.max_seq_len // sparse.block_size)
    layout = _layout_for(dataclasses.astuple(sparse), n_blocks)
    return block_sparse_mask(q_pos, k_pos, sparse.block_size, layout)
