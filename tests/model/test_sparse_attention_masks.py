"""Sparse attention patterns against their per-(i, j) rules written out here, attention through them against a
naive masked softmax, and a model using them: its cached generation against recomputation, and a 1-layer model's
local window against the same model run on just the window's tokens."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.config import ModelConfig
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.reference import greedy_no_cache
from lucidlm.model.attention import attend
from lucidlm.model.sparse_attention_masks import bigbird_layout, block_sparse_mask, local_global_mask

POSITIONS = torch.stack([torch.arange(13), torch.arange(13) + 5])  # two rows: the second starts at position 5


def rule_mask(rule, q_pos, k_pos) -> torch.Tensor:
    b, n, m = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    return torch.tensor([[[[rule(int(q_pos[r, i]), int(k_pos[r, j])) for j in range(m)] for i in range(n)]]
                         for r in range(b)])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,globals_", [(1, 0), (3, 2), (4, 0), (20, 1)])
def test_local_global_equals_its_rule(window, globals_, causal):
    def rule(i, j):
        if causal and j > i:
            return False
        near = 0 <= i - j < window if causal else abs(i - j) < window
        return near or j < globals_ or i < globals_

    got = local_global_mask(POSITIONS, POSITIONS, window, globals_, causal)
    assert got.shape == (2, 1, 13, 13)
    assert torch.equal(got, rule_mask(rule, POSITIONS, POSITIONS))
    assert got.diagonal(dim1=-2, dim2=-1).all()  # a query always sees itself


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_layout_window_global_and_random_blocks(causal):
    n, w, g, r = 9, 2, 1, 2
    layout = bigbird_layout(n, w, g, r, seed=3, causal=causal)

    def fixed(i, j):
        near = 0 <= i - j < w if causal else abs(i - j) < w
        return (near or j < g or i < g) and (not causal or j <= i)

    for i in range(n):
        base = [fixed(i, j) for j in range(n)]
        extra = [j for j in range(n) if layout[i, j] and not base[j]]
        assert all(layout[i, j] for j in range(n) if base[j])
        free = [j for j in range(n) if not base[j] and (not causal or j < i)]
        assert len(extra) == min(r, len(free)) and set(extra) <= set(free)
    assert torch.equal(layout, bigbird_layout(n, w, g, r, seed=3, causal=causal))  # the seed fixes it
    assert not torch.equal(layout, bigbird_layout(n, w, g, r, seed=4, causal=causal))
    if causal:  # row i depends only on the blocks before it
        assert torch.equal(bigbird_layout(n + 5, w, g, r, seed=3)[:n, :n], layout)


@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_equals_its_rule(causal):
    block = 3
    layout = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    layout |= torch.eye(7, dtype=torch.bool)

    def rule(i, j):
        return bool(layout[i // block, j // block]) and (not causal or j <= i)

    got = block_sparse_mask(POSITIONS, POSITIONS, block, layout, causal)
    assert torch.equal(got, rule_mask(rule, POSITIONS, POSITIONS))
    with pytest.raises(ValueError, match="need more blocks"):
        block_sparse_mask(POSITIONS + 10, POSITIONS, block, layout)


def naive_masked_softmax(q, k, v, allowed, scale):
    """out[b, h, i] = Σ_{j allowed} softmax_j(q_i·k_j·scale) v_j, a row at a time with math.exp."""
    b, h, n, _ = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = [j for j in range(n) if allowed[bi, 0, i, j]]
                logits = [float(q[bi, hi, i] @ k[bi, hi, j]) * scale for j in keys]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                out[bi, hi, i] = sum(w * v[bi, hi, j] for w, j in zip(weights, keys)) / sum(weights)
    return out


@pytest.mark.parametrize("pattern", ["local_global", "block_sparse", "bigbird"])
def test_attention_through_the_pattern_equals_naive_masked_softmax(pattern):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64) for _ in range(3))
    if pattern == "local_global":
        mask = local_global_mask(POSITIONS, POSITIONS, window=3, global_tokens=2)
    elif pattern == "block_sparse":
        mask = block_sparse_mask(POSITIONS, POSITIONS, 4, torch.eye(5, dtype=torch.bool) | (torch.rand(5, 5) < .3))
    else:
        mask = block_sparse_mask(POSITIONS, POSITIONS, 2, bigbird_layout(9, 2, 1, 1, seed=0))
    torch.testing.assert_close(attend(q, k, v, mask, 0.35), naive_masked_softmax(q, k, v, mask, 0.35))


SPARSE = {"local_global": dict(pattern="local_global", window=3, global_tokens=2),
          "block_sparse": dict(pattern="block_sparse", block_size=2, window_blocks=2, global_blocks=1,
                               random_blocks=1, seed=5)}


@pytest.mark.parametrize("name", list(SPARSE))
def test_cached_generation_with_a_pattern_equals_recomputation(name):
    model = tiny_model("llama-125m", sparse_attention=SPARSE[name])
    prompts = [[5, 17, 99, 3, 42, 7, 8, 9, 10], [64, 2], [11, 12, 13, 14]]
    got = Generator(model, prefill_chunk=4).generate(prompts, GenerationConfig(max_new_tokens=10))
    for prompt, completion in zip(prompts, got):
        assert completion.token_ids == greedy_no_cache(model, prompt, 10)


def test_one_layer_local_window_sees_exactly_the_window():
    """With RoPE (relative) and one layer, the last token's logits under a window of w equal those of the same
    model run on only the last w tokens with full attention; the dense model on the whole sequence differs."""
    dense = tiny_model("llama-125m", n_layers=1)
    sparse = tiny_model("llama-125m", n_layers=1, sparse_attention=dict(pattern="local_global", window=4,
                                                                         global_tokens=0))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    last = sparse(ids)[0, -1]
    torch.testing.assert_close(last, dense(ids[:, -4:])[0, -1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(last, dense(ids)[0, -1], atol=1e-2)


@pytest.mark.parametrize("bad,match", [
    (dict(pattern="dilated"), "pattern must be one of"),
    (dict(window=0), "sparse_attention.window must be an integer >= 1"),
    (dict(global_tokens=-1), "global_tokens must be an integer >= 0"),
    (dict(pattern="block_sparse", block_size=1), "makes 16384 blocks"),
])
def test_config_names_a_bad_pattern(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(max_seq_len=16384, sparse_attention=bad)
