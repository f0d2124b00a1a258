"""Attention masks against rules written out element by element."""

import pytest
import torch

from lucidlm.model.masks import build_mask, positions_from_attention_mask, to_additive


def naive_mask(q_len, k_len, batch=1, causal=True, key_padding=None, prefix_mask=None, window=None):
    out = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        for qi in range(q_len):
            i = k_len - q_len + qi  # the query's sequence index
            for j in range(k_len):
                ok = (j <= i) if causal else True
                if prefix_mask is not None and bool(prefix_mask[b, i]) and bool(prefix_mask[b, j]):
                    ok = True
                if window is not None and i - j >= window:
                    ok = False
                if key_padding is not None and not bool(key_padding[b, j]):
                    ok = False
                out[b, 0, qi, j] = ok or i == j
    return out


def test_causal():
    m = build_mask(6, 6)
    assert m.shape == (1, 1, 6, 6)
    assert torch.equal(m[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.equal(m, naive_mask(6, 6))


def test_not_causal_is_all_true():
    assert build_mask(4, 4, causal=False).all()


def test_queries_are_the_last_q_len_of_the_keys():
    m = build_mask(2, 5)  # decoding two new tokens after three cached ones
    assert torch.equal(m[0, 0], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(m, naive_mask(2, 5))


def test_prefix_lm():
    s, p = 7, 3
    prefix = torch.zeros(2, s, dtype=torch.bool)
    prefix[0, :p] = True
    prefix[1, :5] = True
    m = build_mask(s, s, batch=2, prefix_mask=prefix)
    assert torch.equal(m, naive_mask(s, s, batch=2, prefix_mask=prefix))
    row = m[0, 0]
    assert row[:p, :p].all()  # prefix tokens see each other both ways
    assert not row[:p, p:].any()  # prefix never sees the continuation
    assert torch.equal(row[p:, :], torch.ones(s, s, dtype=torch.bool).tril()[p:])  # the rest is causal
    assert not (row & ~torch.ones(s, s, dtype=torch.bool).tril())[p:].any()  # nothing after the prefix sees ahead


def test_padding_keys_never_attended():
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m = build_mask(5, 5, batch=2, key_padding=pad)
    assert torch.equal(m, naive_mask(5, 5, batch=2, key_padding=pad))
    # real queries never look at padding keys
    assert not m[0, 0, 2:, :2].any()
    # a padding query keeps its own position, so no row is empty (softmax stays finite)
    assert m.any(-1).all()


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_sliding_window(window):
    m = build_mask(8, 8, window=window)
    assert torch.equal(m, naive_mask(8, 8, window=window))
    i = torch.arange(8)[:, None]
    j = torch.arange(8)[None, :]
    assert torch.equal(m[0, 0], (j <= i) & (i - j < window))


def test_combined_rules_match_naive():
    g = torch.Generator().manual_seed(1)
    pad = (torch.rand(3, 9, generator=g) > 0.3).long()
    prefix = torch.zeros(3, 9, dtype=torch.bool)
    prefix[:, :4] = True
    for q_len in (9, 4, 1):
        m = build_mask(q_len, 9, batch=3, key_padding=pad, prefix_mask=prefix, window=5)
        assert torch.equal(m, naive_mask(q_len, 9, batch=3, key_padding=pad, prefix_mask=prefix, window=5))


def test_diagonal_always_allowed_even_when_everything_else_is_masked():
    pad = torch.zeros(1, 4, dtype=torch.long)
    m = build_mask(4, 4, key_padding=pad, window=1)
    assert torch.equal(m[0, 0], torch.eye(4, dtype=torch.bool))


def test_to_additive():
    m = build_mask(3, 3)
    add = to_additive(m, torch.float32)
    assert (add[m] == 0).all()
    assert (add[~m] == torch.finfo(torch.float32).min).all()


def test_positions_from_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    expected = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        n = 0
        for s in range(mask.shape[1]):
            expected[b, s] = max(n - 1, 0) if not mask[b, s] else n
            n += int(mask[b, s])
    pos = positions_from_attention_mask(mask)
    assert torch.equal(pos[mask.bool()], expected[mask.bool()])  # real tokens: 0, 1, 2, ... skipping padding
    assert torch.equal(pos[0], torch.tensor([0, 0, 0, 1, 2]))
    assert (pos >= 0).all()  # padding slots get a valid position
