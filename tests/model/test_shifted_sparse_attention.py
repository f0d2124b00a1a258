"""S2-Attn against a loop over explicit groups (LongLoRA's later cut: plain heads at 0, G, 2G, ..., shifted heads at
0, G/2, 3G/2, ..., s), the one-group case against full causal attention, and the model: grouped in train(),
full attention in eval()."""

from __future__ import annotations

import math

import pytest
import torch

from lucidlm.config import DualChunkConfig, MLAConfig, from_preset
from lucidlm.model.attention import attend
from lucidlm.model.masks import build_mask
from lucidlm.model.shifted_sparse_attention import s2_attend, set_s2_attn_group, shift, unshift
from lucidlm.model.transformer import Transformer


def naive_s2(q, k, v, group, mask, scale, bias=None):
    """Loops over batch rows, heads and the groups written out by hand; softmax over the allowed keys of a group."""
    b, h, s, _ = q.shape
    plain = [list(range(g, g + group)) for g in range(0, s, group)]
    half = group // 2
    shifted = [list(range(half))] + [list(range(g, g + group)) for g in range(half, s - half, group)] + \
        [list(range(s - half, s))]
    out = torch.zeros(b, h, s, v.shape[-1], dtype=q.dtype)
    for row in range(b):
        for head in range(h):
            kv_head = head // (h // k.shape[1])
            for members in (plain if head < h // 2 else shifted):
                for i in members:
                    keys = [j for j in members if mask is None or mask[row, 0, i, j]]
                    scores = torch.stack([q[row, head, i] @ k[row, kv_head, j] * scale for j in keys])
                    if bias is not None:
                        scores = scores + torch.stack([bias[row, head, i, j] for j in keys])
                    weights = torch.softmax(scores, dim=0)
                    out[row, head, i] = sum(w * v[row, kv_head, j] for w, j in zip(weights, keys))
    return out


def qkv(batch=2, heads=4, kv_heads=2, seq=16, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, seq, dim, generator=g), torch.randn(batch, kv_heads, seq, dim, generator=g),
            torch.randn(batch, kv_heads, seq, dim, generator=g))


def test_shift_rolls_half_the_heads_into_groups_and_unshift_undoes_it():
    x = torch.randn(2, 4, 16, 3)
    grouped = shift(x, 4)  # (2·4 groups, 4 heads, 4, 3)
    assert grouped.shape == (8, 4, 4, 3)
    for row, g, i in ((0, 0, 0), (1, 2, 3), (1, 3, 1), (0, 3, 3)):
        torch.testing.assert_close(grouped[row * 4 + g, :2, i], x[row, :2, 4 * g + i], rtol=0, atol=0)
        torch.testing.assert_close(grouped[row * 4 + g, 2:, i], x[row, 2:, (4 * g + i + 2) % 16], rtol=0, atol=0)
    torch.testing.assert_close(unshift(grouped, 2), x, rtol=0, atol=0)


@pytest.mark.parametrize("kv_heads, group, case", [
    (2, 4, "causal"), (4, 8, "padding"), (1, 4, "window"), (2, 4, "bias"), (2, 16, "causal")])
def test_s2_attend_matches_the_loop_over_groups(kv_heads, group, case):
    q, k, v = qkv(kv_heads=kv_heads)
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 11:] = 0  # row 1 right-padded, as SFT batches are
    mask = build_mask(16, 16, batch=2, key_padding=padding if case == "padding" else None,
                      window=3 if case == "window" else None)
    bias = torch.randn(2, 4, 16, 16) if case == "bias" else None
    scale = 1 / math.sqrt(8)
    expected = naive_s2(q, k, v, group, mask, scale, bias)
    torch.testing.assert_close(s2_attend(q, k, v, group, mask, scale, bias), expected, rtol=1e-5, atol=1e-5)


def test_one_group_is_full_attention_for_the_plain_heads_and_two_halves_for_the_shifted():
    q, k, v = qkv(kv_heads=4)
    mask, scale = build_mask(16, 16, batch=2), 0.3
    out = s2_attend(q, k, v, 16, mask, scale)
    full = attend(q, k, v, mask, scale)
    torch.testing.assert_close(out[:, :2], full[:, :2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, 2:], full[:, 2:], atol=1e-3)  # the shifted heads are cut at 8
    for part in (slice(0, 8), slice(8, 16)):  # nothing crosses the cut, so the first 8 never see a later token
        torch.testing.assert_close(out[:, 2:, part], attend(q[:, 2:, part], k[:, 2:, part], v[:, 2:, part],
                                                            build_mask(8, 8, batch=2), scale), rtol=1e-5, atol=1e-6)


def test_a_sequence_not_a_whole_number_of_groups_is_refused_naming_both():
    q, k, v = qkv(seq=12)
    with pytest.raises(ValueError, match="sequence length 12 is not a multiple of the group size 8"):
        s2_attend(q, k, v, 8, None, 1.0)


def tiny(**overrides):
    cfg = from_preset("llama-125m", tiny=True, n_heads=4, n_kv_heads=2, max_seq_len=64, **overrides)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_the_model_attends_in_groups_in_training_and_fully_at_inference():
    grouped, plain = tiny(s2_attn_group=4), tiny()
    plain.load_state_dict(grouped.state_dict())
    ids = torch.randint(0, grouped.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    trained = grouped.train()(ids)
    with torch.no_grad():
        torch.testing.assert_close(grouped.eval()(ids), plain.eval()(ids), rtol=0, atol=0)
        assert not torch.allclose(trained, plain(ids), atol=1e-4)
        torch.testing.assert_close(trained[:, :2], plain(ids)[:, :2])  # tokens 0, 1 lie in the first cut of all heads
    trained.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grouped.parameters())
    with pytest.raises(ValueError, match="sequence length 10 is not a multiple of the group size 4"):
        grouped.train()(ids[:, :10])
    set_s2_attn_group(grouped, None)  # switched off: full attention in training too
    torch.testing.assert_close(grouped(ids), plain.train()(ids))
    set_s2_attn_group(grouped, 8)
    assert grouped.config.s2_attn_group == 8 and not torch.allclose(grouped(ids), plain(ids), atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (dict(s2_attn_group=3), "s2_attn_group must be an even integer >= 2"),
    (dict(s2_attn_group=True), "s2_attn_group must be an even integer >= 2"),
    (dict(s2_attn_group=128), r"s2_attn_group \(128\) exceeds max_seq_len \(64\)"),
    (dict(s2_attn_group=4, n_heads=3, n_kv_heads=1, dim=48), "n_heads must be even, got 3"),
    (dict(s2_attn_group=4, mla=MLAConfig(kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                         v_head_dim=8)), "does not combine with mla="),
    (dict(s2_attn_group=4, attention="linear", positions="none"), "does not combine with attention='linear'"),
    (dict(s2_attn_group=4, dual_chunk=DualChunkConfig(8, 2)), "does not combine with dual_chunk="),
])
def test_configs_s2_attn_cannot_serve_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_preset("llama-125m", tiny=True, max_seq_len=64, **{"n_heads": 4, "n_kv_heads": 2, **overrides})
