"""Greedy decoding by recomputing the whole sequence every step: no cache, nothing clever.

It costs O(n²) forwards but is obviously right, which makes it the reference a KV-cached engine
must reproduce token for token.
"""

from __future__ import annotations

import torch

from ..model.transformer import Transformer


@torch.no_grad()
def greedy_no_cache(
    model: Transformer, input_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """The greedy continuation (new ids only) of one prompt."""
    if not input_ids:
        raise ValueError("input_ids is empty: a prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.config.max_seq_len:
            break
        next_id = int(model(ids)[0, -1].argmax())
        new.append(next_id)
        if next_id == eos_token_id:
            break
        ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
    return new
