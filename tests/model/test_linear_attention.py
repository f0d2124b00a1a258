"""Linear attention (Katharopoulos et al. 2020) against its formula written as explicit per-position sums, its
recurrent form against its parallel forms token by token, a tiny model that learns with it, and cached generation
against recomputation."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.config import ModelConfig, from_preset
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.reference import greedy_no_cache
from lucidlm.model.kv_cache import KVCache, kv_cache_bytes, kv_cache_bytes_per_token
from lucidlm.model.linear_attention import (
    EPS,
    feature_map,
    linear_attention_chunked,
    linear_attention_masked,
    linear_attention_recurrent,
    recurrent_step,
)
from lucidlm.model.transformer import Transformer

LINEAR = dict(attention="linear", positions="learned")


def naive(phi_q, phi_k, v, allowed):
    """out[b, h, i] = Σ_{j allowed} (φq_i·φk_j) v_j / (Σ_{j allowed} φq_i·φk_j + eps), one (i, j) at a time."""
    b, h, n, _ = phi_q.shape
    group = h // phi_k.shape[1]
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
                for j in range(n):
                    if allowed(bi, i, j):
                        w = float(phi_q[bi, hi, i] @ phi_k[bi, hi // group, j])
                        num += w * v[bi, hi // group, j]
                        den += w
                out[bi, hi, i] = num / (den + EPS)
    return out


def inputs(b=2, h=4, kv=2, n=11, d=5, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, kv, n, d, generator=g)
    v = torch.randn(b, kv, n, dv, generator=g)
    return feature_map(q.double()), feature_map(k.double()), v.double()


def test_feature_map_is_elu_plus_one_and_never_negative():
    x = torch.linspace(-10, 10, 101, dtype=torch.float64)
    torch.testing.assert_close(feature_map(x), torch.where(x > 0, x + 1, torch.exp(x)))
    assert (feature_map(torch.randn(1000) * 50) >= 0).all()  # far below 0 it rounds to 0: eps keeps den > 0


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_parallel_forms_equal_the_naive_causal_sums(chunk):
    phi_q, phi_k, v = inputs()  # 4 query heads over 2 kv heads (GQA), 11 positions: chunks do not divide it
    expected = naive(phi_q, phi_k, v, lambda b, i, j: j <= i)
    torch.testing.assert_close(linear_attention_masked(phi_q, phi_k, v), expected)
    out, _ = linear_attention_chunked(phi_q, phi_k, v, chunk=chunk)
    torch.testing.assert_close(out, expected)


def test_masked_form_takes_any_mask():
    phi_q, phi_k, v = inputs(n=7)
    mask = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) < 0.6
    mask |= torch.eye(7, dtype=torch.bool)
    expected = naive(phi_q, phi_k, v, lambda b, i, j: bool(mask[b, 0, i, j]))
    torch.testing.assert_close(linear_attention_masked(phi_q, phi_k, v, mask), expected)


def test_recurrent_form_equals_the_parallel_form_token_by_token():
    phi_q, phi_k, v = inputs(n=9)
    parallel, (s_all, z_all) = linear_attention_chunked(phi_q, phi_k, v, chunk=4)
    state = (torch.zeros(2, 2, 5, 3, dtype=torch.float64), torch.zeros(2, 2, 5, dtype=torch.float64))
    for i in range(9):
        out, state = recurrent_step(phi_q[:, :, i], phi_k[:, :, i], v[:, :, i], state)
        torch.testing.assert_close(out, parallel[:, :, i])
        s_i = torch.einsum("bknd,bkne->bkde", phi_k[:, :, : i + 1], v[:, :, : i + 1])  # S_i = Σ_{j≤i} φ(k_j) v_jᵀ
        torch.testing.assert_close(state[0], s_i)
        torch.testing.assert_close(state[1], phi_k[:, :, : i + 1].sum(2))
    torch.testing.assert_close(state[0], s_all)
    torch.testing.assert_close(state[1], z_all)
    looped, _ = linear_attention_recurrent(phi_q, phi_k, v)
    torch.testing.assert_close(looped, parallel)


def test_a_sequence_continued_from_a_state_equals_it_whole():
    phi_q, phi_k, v = inputs(n=12)
    whole, end = linear_attention_chunked(phi_q, phi_k, v, chunk=5)
    first, mid = linear_attention_chunked(phi_q[:, :, :7], phi_k[:, :, :7], v[:, :, :7], chunk=5)
    rest, end2 = linear_attention_chunked(phi_q[:, :, 7:], phi_k[:, :, 7:], v[:, :, 7:], mid, chunk=2)
    torch.testing.assert_close(torch.cat([first, rest], dim=2), whole)
    torch.testing.assert_close(end2[0], end[0])


def model(**overrides) -> Transformer:
    m = Transformer(from_preset("llama-125m", tiny=True, **LINEAR, **overrides)).eval()
    m.init_weights(torch.Generator().manual_seed(0))
    return m


def test_left_padding_leaves_the_real_tokens_outputs_unchanged():
    m = model()
    ids = torch.tensor([[5, 9, 2, 7], [0, 0, 3, 8]])
    padded = m(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    alone = m(ids[1:, 2:])
    torch.testing.assert_close(padded[1, 2:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype):
    m = model()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = m(ids)
    half = m.to(dtype)(ids)
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), ref, atol=0.1, rtol=0.05)


def test_tiny_model_with_linear_attention_learns():
    torch.manual_seed(0)
    m = model(n_layers=2).train()
    data = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = m(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_cached_generation_equals_recomputation():
    m = tiny_model("llama-125m", **LINEAR)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [64, 2], [11, 12, 13, 14]]
    got = Generator(m, prefill_chunk=3).generate(prompts, GenerationConfig(max_new_tokens=12))  # left-padded batch
    for prompt, completion in zip(prompts, got):
        assert completion.token_ids == greedy_no_cache(m, prompt, 12)
    best = Generator(m).generate([prompts[0]], GenerationConfig(max_new_tokens=6), n=2)  # copy_slot shares a state
    assert best[0].token_ids == best[1].token_ids == greedy_no_cache(m, prompts[0], 6)


def test_the_cache_holds_a_constant_state_and_refuses_prefix_copies():
    cfg = from_preset("llama-125m", tiny=True, **LINEAR)
    cache = KVCache(cfg, n_slots=2, max_len=64)
    s, z = cache.layers[0]
    assert s.shape == (2, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim) and z.shape == (2, cfg.n_kv_heads, cfg.head_dim)
    assert s.dtype == torch.float32
    assert kv_cache_bytes_per_token(cfg) == 0
    assert kv_cache_bytes(cfg, 10, batch=2) == kv_cache_bytes(cfg, 60, batch=2) == cache.nbytes()
    with pytest.raises(ValueError, match="linear-attention cache holds a state"):
        cache.read_cells(0, 0, 4)


@pytest.mark.parametrize("clash", [dict(positions="rope"), dict(positions="alibi"), dict(sliding_window=8),
                                   dict(attn_scale=0.5), dict(sparse_attention=dict(pattern="local_global"))])
def test_config_refuses_what_linear_attention_cannot_use(clash):
    with pytest.raises(ValueError, match="attention='linear' does not combine"):
        ModelConfig(**{**LINEAR, **clash})


def test_prefix_lm_mask_is_refused():
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="prefix_mask needs softmax attention"):
        model()(ids, prefix_mask=torch.tensor([[True, True, False]]))
