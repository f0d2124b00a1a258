"""Dual chunk attention against the paper's position-index matrices (An et al. 2024, §3), computed naively:
the three P_q arrays and P_k written out, M built per (query, key) pair, each score a dot product of two
explicitly rotated vectors."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.config import DualChunkConfig, ModelConfig, from_preset
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.reference import greedy_no_cache
from lucidlm.model.dual_chunk_attention import relative_positions
from lucidlm.model.masks import build_mask
from lucidlm.model.transformer import Transformer

S, W = 6, 4  # the paper's Figure 2: chunk size s = 6, local window w = 4, pretraining window c = s + w = 10
C = S + W


def paper_position_arrays(n: int, s: int, w: int) -> dict[str, list[int]]:
    """P_k, P_q^Intra, P_q^Succ, P_q^Inter for a sequence of n tokens, as the paper lists them."""
    c = s + w
    per_chunk_succ = [s + i for i in range(w)] + [c - 1] * (s - w)  # [s, s+1, ..., s+w-1, c-1, ..., c-1]
    return {"k": [j % s for j in range(n)], "intra": [i % s for i in range(n)],
            "succ": [per_chunk_succ[i % s] for i in range(n)], "inter": [c - 1] * n}


def paper_matrix(n: int, s: int, w: int) -> list[list[int | None]]:
    """M[i][j] for j <= i (None above the diagonal): P_q of the pair's case minus P_k[j]."""
    p = paper_position_arrays(n, s, w)
    m: list[list[int | None]] = []
    for i in range(n):
        row: list[int | None] = []
        for j in range(n):
            apart = i // s - j // s
            query = p["intra"][i] if apart == 0 else p["succ"][i] if apart == 1 else p["inter"][i]
            row.append(query - p["k"][j] if j <= i else None)
        m.append(row)
    return m


def rotate(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication of the (i, i + d/2) channel pairs of one vector x: (d,)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[:half], x[half:]) * torch.polar(torch.ones(half, dtype=x.dtype), position * inv_freq)
    return torch.cat((z.real, z.imag))


def test_relative_positions_are_the_papers_matrix_and_stay_in_the_trained_range():
    n = 40
    pos = torch.arange(n)[None]
    ours = relative_positions(pos, pos, DualChunkConfig(S, W))[0]
    paper = paper_matrix(n, S, W)
    causal = [(i, j) for i in range(n) for j in range(i + 1)]
    assert all(ours[i, j].item() == paper[i][j] for i, j in causal)
    used = torch.tensor([paper[i][j] for i, j in causal])
    assert used.min() == 0 and used.max() == C - 1  # never beyond what a model trained on c tokens has seen
    assert all(paper[i][j] == i - j for i, j in causal if i // S == j // S)  # intra: the true distance
    # successive chunk: the first w queries of a chunk see the previous chunk at the true distance
    assert all(paper[i][j] == i - j for i, j in causal if i // S - j // S == 1 and i % S < W)
    assert {paper[i][j] for i, j in causal if i // S - j // S >= 2} == set(range(C - S, C))  # inter: c-1-P_k


@pytest.mark.parametrize("trained", [256, 600])
def test_default_config_keeps_positions_below_the_trained_length(trained):
    cfg = DualChunkConfig.for_trained_length(trained)
    pos = torch.arange(4 * trained)[None]
    m = relative_positions(pos, pos, cfg)[0]
    causal = torch.ones(m.shape, dtype=torch.bool).tril()
    assert m[causal].min() == 0 and m[causal].max() == cfg.chunk_size + cfg.local_window - 1 < trained


def dca_config(**overrides) -> ModelConfig:
    return from_preset("llama-125m", tiny=True, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64,
                       dual_chunk=dict(chunk_size=S, local_window=W), **overrides)


@pytest.mark.parametrize("n", [5, 23])
def test_attention_equals_naive_per_pair_rotation(n):
    """One layer's attention output against softmax over j <= i of rot(q_i, P_q[i]) · rot(k_j, P_k[j]) · scale,
    P_q taken from the pair's case of the paper's arrays; GQA heads share their K/V head."""
    torch.manual_seed(0)
    model = Transformer(dca_config()).eval()
    model.init_weights(torch.Generator().manual_seed(1))
    attn, cfg = model.blocks[0].attn, model.config
    x = torch.randn(1, n, cfg.dim)
    pos = torch.arange(n)[None]
    with torch.no_grad():
        ours = attn(x, model._rope(pos, torch.float32)[False], build_mask(n, n))
        q = attn.q_proj(x).view(n, cfg.n_heads, cfg.head_dim).double()
        k = attn.k_proj(x).view(n, cfg.n_kv_heads, cfg.head_dim).double()
        v = attn.v_proj(x).view(n, cfg.n_kv_heads, cfg.head_dim).double()
        inv_freq = model.rotary.inv_freq.double()
        p = paper_position_arrays(n, S, W)
        heads = []
        for h in range(cfg.n_heads):
            kv = h // (cfg.n_heads // cfg.n_kv_heads)
            rows = []
            for i in range(n):
                scores = []
                for j in range(i + 1):
                    apart = i // S - j // S
                    query_pos = p["intra"][i] if apart == 0 else p["succ"][i] if apart == 1 else p["inter"][i]
                    qi, kj = rotate(q[i, h], query_pos, inv_freq), rotate(k[j, kv], p["k"][j], inv_freq)
                    scores.append(float(qi @ kj) / math.sqrt(cfg.head_dim))
                weights = torch.tensor(scores, dtype=torch.float64).softmax(0)
                rows.append(weights @ v[: i + 1, kv])
            heads.append(torch.stack(rows))
        naive = attn.o_proj(torch.stack(heads, dim=1).reshape(1, n, -1).float())
    torch.testing.assert_close(ours, naive, rtol=1e-4, atol=1e-5)


def test_shorter_than_one_chunk_equals_ordinary_attention():
    plain = tiny_model("llama-125m", seed=2, max_seq_len=64)
    dca = Transformer(plain.config.replace(dual_chunk=dict(chunk_size=16, local_window=4))).eval()
    dca.load_state_dict(plain.state_dict())
    ids = torch.randint(0, plain.config.vocab_size, (2, 16))  # exactly one chunk
    with torch.no_grad():
        torch.testing.assert_close(dca(ids), plain(ids), rtol=1e-5, atol=1e-5)
        longer = torch.randint(0, plain.config.vocab_size, (1, 40))
        assert not torch.allclose(dca(longer), plain(longer), atol=1e-3)  # beyond one chunk it differs


def test_cached_decode_equals_recomputation():
    """Keys are cached rotated by P_k; each step's queries take their positions from the cached keys' position ids."""
    model = tiny_model("llama-125m", seed=4, max_seq_len=64, dual_chunk=dict(chunk_size=S, local_window=W))
    prompts = [[5, 17, 99, 3, 42, 7, 8, 1, 2, 3, 4, 5, 6, 7], [64, 2], [11, 12, 13, 14]]
    got = Generator(model, prefill_chunk=4).generate(prompts, GenerationConfig(max_new_tokens=10))
    for prompt, completion in zip(prompts, got):
        assert completion.token_ids == greedy_no_cache(model, prompt, 10)


@pytest.mark.parametrize("overrides,match", [
    (dict(dual_chunk=dict(chunk_size=4, local_window=5)), "local_window"),
    (dict(dual_chunk=dict(chunk_size=0, local_window=0)), "chunk_size"),
    (dict(positions="alibi", dual_chunk=dict(chunk_size=8, local_window=2)), "positions='rope'"),
    (dict(sliding_window=8, dual_chunk=dict(chunk_size=8, local_window=2)), "sliding_window"),
    (dict(dual_chunk=dict(chunk_size=8, window=2)), "unknown ModelConfig.dual_chunk fields"),
])
def test_bad_dual_chunk_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_preset("llama-125m", tiny=True, **overrides)
