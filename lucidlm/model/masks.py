"""Attention masks: which keys each query may look at.

All masks here are boolean, True = may attend, shape (batch, 1, q_len, k_len), built from
*sequence indices* (where a token sits in the padded batch), not from position ids (which
skip padding). They compose:

- causal: key index ≤ query index (decoder-only language models);
- prefix-LM: tokens of the prefix (the prompt) also see each other both ways (UniLM, T5's
  prefix-LM, GLM); the rest stays causal;
- padding: keys marked 0 in ``attention_mask`` are never attended;
- sliding window: only the last ``window`` keys (query index − key index < window; Mistral).

A query whose every key is masked (a left-padding slot) would make softmax produce NaN, so each
query always keeps its own position; such rows are padding and their outputs are ignored.
"""

from __future__ import annotations

import torch


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: the n-th real token of a row gets position n."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_mask(
    q_len: int,
    k_len: int,
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
    causal: bool = True,
    key_padding: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean mask (batch, 1, q_len, k_len); queries are the last ``q_len`` of the ``k_len`` keys.

    key_padding: (batch, k_len), 1/True for real tokens.
    prefix_mask: (batch, k_len), True for tokens of the bidirectional prefix.
    """
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (q, 1)
    k_idx = torch.arange(k_len, device=device)[None, :]  # (1, k)
    allowed = (k_idx <= q_idx) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    allowed = allowed[None, None].expand(batch, 1, q_len, k_len)
    if prefix_mask is not None:
        prefix = prefix_mask.bool()
        both = prefix[:, None, -q_len:, None] & prefix[:, None, None, :]  # (batch, 1, q, k)
        allowed = allowed | both
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, None, :]
    return allowed | (k_idx == q_idx)  # never an empty row


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive bias (0 where allowed, a large negative where not)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
