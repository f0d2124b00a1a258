"""Shifted sparse attention (S²-Attn; Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context LLMs").

Fine-tuning at a long context costs O(s²) attention. S²-Attn cuts the sequence into groups of G tokens and
attends only within a group (O(s·G)); so that information still flows from group to group, half of the heads
see groups shifted by G/2:

    heads 0 .. h/2-1    groups [0, G)    [G, 2G)      ...  [s-G, s)
    heads h/2 .. h-1    groups [0, G/2)  [G/2, 3G/2)  ...  [s-G/2, s)      (rolled by -G/2, then cut every G)

It is used only in training (``ModelConfig.s2_attn_group``, a model in ``train()`` mode without a KV cache):
the fine-tuned model runs ordinary full attention at inference, which is LongLoRA's point — the weights do not
change, only how the training forward attends.

The shift is the paper's (its Algorithm 1): ``torch.roll(-G/2)`` of the shifted heads along the sequence, a cut
every G, and a roll back of the output. The rolled heads' last group then holds the last G/2 tokens followed by the
first G/2; masked causally by place in the group, as Algorithm 1 and LongLoRA's first code do, the first G/2
tokens see the last ones — a future leak (its issues #15 and #90). LongLoRA's later flash-attention code cuts the
shifted heads at G/2, 3G/2, ... instead, with no wrap, and that is what is computed here: the wrapped group's two
halves are kept apart, and within a group the mask is the layer's own, taken at the tokens' true places (so it is
causal by position and carries padding, a prefix-LM prompt, a sliding window or a fixed sparse pattern along); an
additive bias (ALiBi, T5) is taken from the same places, per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_group(seq_len: int, group_size: int) -> None:
    """ValueError unless ``seq_len`` is a whole number of groups (the paper's requirement)."""
    if seq_len % group_size:
        raise ValueError(f"S2-Attn: the sequence length {seq_len} is not a multiple of the group size {group_size} "
                         "(ModelConfig.s2_attn_group); pad or cut the batch to a multiple of it")


def shift(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(batch, heads, seq, d) -> (batch · n_groups, heads, group_size, d): the second half of the heads rolled
    by -group_size/2 along the sequence, then every head cut into groups of ``group_size`` tokens."""
    b, h, s, d = x.shape
    half = h // 2
    x = torch.cat([x[:, :half], x[:, half:].roll(-(group_size // 2), dims=2)], dim=1)
    return x.view(b, h, s // group_size, group_size, d).transpose(1, 2).reshape(-1, h, group_size, d)


def unshift(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of ``shift``: (batch · n_groups, heads, group_size, d) -> (batch, heads, seq, d)."""
    bn, h, g, d = x.shape
    x = x.view(batch, bn // batch, h, g, d).transpose(1, 2).reshape(batch, h, -1, d)
    half = h // 2
    return torch.cat([x[:, :half], x[:, half:].roll(g // 2, dims=2)], dim=1)


def group_positions(seq_len: int, group_size: int, shifted: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_groups, group_size): the sequence index of each token of each group (after the roll, when shifted)."""
    idx = torch.arange(seq_len, device=device)
    if shifted:
        idx = (idx + group_size // 2) % seq_len  # roll(-G/2): place i holds token i + G/2
    return idx.view(seq_len // group_size, group_size)


def same_segment(seq_len: int, group_size: int, shifted: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_groups, 1, G, G) bool: the two tokens lie in the same cut. The shifted heads are cut at G/2, 3G/2, ...,
    so in their last (wrapped) group the last G/2 tokens and the first G/2 are two cuts; every other group is one."""
    idx = group_positions(seq_len, group_size, shifted, device)
    cut = (idx + group_size // 2) // group_size if shifted else idx // group_size  # (n, G)
    return (cut[:, :, None] == cut[:, None, :])[:, None]


def _per_group(t: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
    """A (b | 1, heads | 1, s, s) mask or bias at the groups' places -> (batch · n_groups, heads | 1, G, G)."""
    blocks = t[:, :, idx[:, :, None], idx[:, None, :]]  # (b | 1, heads | 1, n, G, G)
    blocks = blocks.expand(batch, *blocks.shape[1:]).transpose(1, 2)  # (batch, n, heads | 1, G, G)
    return blocks.reshape(-1, *blocks.shape[2:])


def s2_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    mask: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention within groups, half of the heads shifted by group_size/2; the layout of ``attention.attend``.

    q: (batch, heads, seq, d); k, v: (batch, kv_heads, seq, d|dv), RoPE already applied at the true positions.
    mask: bool (batch | 1, 1, seq, seq), True = attend — the mask full attention would use (None: no mask).
    bias: additive (batch | 1, heads, seq, seq). Returns (batch, heads, seq, dv).
    """
    b, h, s, _ = q.shape
    kv = k.shape[1]
    check_group(s, group_size)
    if h % 2 or group_size % 2:
        raise ValueError(f"S2-Attn shifts half of {h} heads by half of the group size {group_size}: both must be even")
    if kv % 2:  # one K/V head serves both halves (MQA, or an odd count): give every query head its own copy
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        kv = h
    qs, ks, vs = (shift(t, group_size) for t in (q, k, v))
    outs = []
    for half, shifted in enumerate((False, True)):
        heads, kv_heads = slice(half * h // 2, (half + 1) * h // 2), slice(half * kv // 2, (half + 1) * kv // 2)
        idx = group_positions(s, group_size, shifted, q.device)
        attn_mask = same_segment(s, group_size, shifted, q.device).repeat(b, 1, 1, 1)  # (b·n, 1, G, G)
        if mask is not None:
            attn_mask = attn_mask & _per_group(mask, idx, b)
        if bias is not None:
            add = _per_group(bias[:, heads], idx, b).to(q.dtype)  # (b·n, h/2, G, G)
            attn_mask = add if attn_mask is None else add.masked_fill(~attn_mask, torch.finfo(q.dtype).min)
        outs.append(F.scaled_dot_product_attention(qs[:, heads], ks[:, kv_heads], vs[:, kv_heads], attn_mask=attn_mask,
                                                   scale=scale, enable_gqa=kv != h))
    return unshift(torch.cat(outs, dim=1), b)


def set_s2_attn_group(model: torch.nn.Module, group_size: int | None) -> None:
    """Turn S²-Attn on (or off, with None) for a built model's training forwards: its config is replaced
    (checked, so a combination S²-Attn does not support is refused by name) and every attention follows it."""
    model.config = model.config.replace(s2_attn_group=group_size)
    for m in model.modules():
        if hasattr(m, "s2_group"):
            m.s2_group = group_size
