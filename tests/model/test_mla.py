"""Multi-head latent attention: the absorbed (latent-space) computation equals the naive one, and
the naive one equals attention over explicitly expanded per-head keys and values."""

import math

import pytest
import torch

from lucidlm.config import MLAConfig, ModelConfig, RopeScaling
from lucidlm.model.alibi import alibi_bias, alibi_slopes
from lucidlm.model.masks import build_mask
from lucidlm.model.mla import MultiHeadLatentAttention, mla_softmax_scale
from lucidlm.model.rope import RotaryEmbedding, apply_rope


def cfg_for(q_lora_rank, **kw) -> ModelConfig:
    mla = MLAConfig(kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
    return ModelConfig(dim=40, n_heads=4, vocab_size=16, n_layers=1, ffn_dim=32, max_seq_len=64, mla=mla, **kw)


def build(cfg):
    m = MultiHeadLatentAttention(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def rope_for(cfg, s, b):
    rot = RotaryEmbedding(cfg.mla.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    return rot(torch.arange(s).expand(b, s), torch.float32)


def naive_mla(m: MultiHeadLatentAttention, cfg: ModelConfig, x, rope, mask, bias=None):
    """Per head: q = [q_nope, rope(q_pe)], k = [W_UK c, rope(k_pe)], v = W_UV c, ordinary attention."""
    mla = cfg.mla
    b, s, _ = x.shape
    h, nope, rd, vd, r = cfg.n_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    if mla.q_lora_rank is None:
        q = x @ m.q_proj.weight.T
    else:
        qa = x @ m.q_a_proj.weight.T
        qa = qa / torch.sqrt(qa.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * m.q_a_layernorm.weight
        q = qa @ m.q_b_proj.weight.T
    q = q.view(b, s, h, nope + rd)
    kv_a = x @ m.kv_a_proj_with_mqa.weight.T
    c, k_pe = kv_a[..., :r], kv_a[..., r:]
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * m.kv_a_layernorm.weight
    w = m.kv_b_proj.weight.view(h, nope + vd, r)
    k_pe = apply_rope(k_pe[:, None], *rope)[:, 0]  # (b, s, rd), shared by all heads
    out = torch.empty(b, s, h, vd)
    for head in range(h):
        q_h = torch.cat([q[:, :, head, :nope], apply_rope(q[:, None, :, head, nope:], *rope)[:, 0]], -1)
        k_h = torch.cat([c @ w[head, :nope].T, k_pe], -1)
        v_h = c @ w[head, nope:].T
        scores = q_h @ k_h.transpose(-1, -2) / math.sqrt(nope + rd)
        if bias is not None:
            scores = scores + bias[:, head]
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        out[:, :, head] = scores.softmax(-1) @ v_h
    return out.reshape(b, s, h * vd) @ m.o_proj.weight.T


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_naive_path_equals_explicit_per_head_attention(q_lora_rank):
    cfg = cfg_for(q_lora_rank)
    m = build(cfg)
    x = torch.randn(2, 7, cfg.dim)
    rope = rope_for(cfg, 7, 2)
    mask = build_mask(7, 7, batch=2, key_padding=torch.tensor([[1] * 7, [0, 0] + [1] * 5]))
    torch.testing.assert_close(m(x, rope, mask), naive_mla(m, cfg, x, rope, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("with_bias", [False, True])
def test_absorbed_equals_naive(q_lora_rank, with_bias):
    cfg = cfg_for(q_lora_rank)
    m = build(cfg)
    x = torch.randn(2, 9, cfg.dim)
    rope = rope_for(cfg, 9, 2)
    mask = build_mask(9, 9, batch=2, key_padding=torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6]), window=5)
    pos = torch.arange(9).expand(2, 9)
    bias = alibi_bias(alibi_slopes(cfg.n_heads), pos, pos) if with_bias else None
    naive = m(x, rope, mask, bias)
    m.absorbed = True
    absorbed = m(x, rope, mask, bias)
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-5)
    assert naive.abs().max() > 1e-2  # not trivially zero


def test_absorbed_equals_naive_with_interleaved_rope():
    cfg = cfg_for(24, rope_interleaved=True)
    m = build(cfg)
    x = torch.randn(1, 6, cfg.dim)
    rope, mask = rope_for(cfg, 6, 1), build_mask(6, 6)
    naive = m(x, rope, mask)
    m.absorbed = True
    torch.testing.assert_close(m(x, rope, mask), naive, rtol=0, atol=1e-5)
    m.rope_interleaved = False  # the layout matters: a different pairing gives a different result
    assert not torch.allclose(m(x, rope, mask), naive, atol=1e-4)


def test_latent_shapes_and_content():
    cfg = cfg_for(None)
    m = build(cfg)
    x = torch.randn(3, 5, cfg.dim)
    c_kv, k_pe = m.latent(x)
    assert c_kv.shape == (3, 5, cfg.mla.kv_lora_rank)
    assert k_pe.shape == (3, 1, 5, cfg.mla.qk_rope_head_dim)
    full = x @ m.kv_a_proj_with_mqa.weight.T
    torch.testing.assert_close(k_pe[:, 0], full[..., cfg.mla.kv_lora_rank:])  # un-rotated
    c = full[..., : cfg.mla.kv_lora_rank]
    torch.testing.assert_close(c_kv, c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
                               * m.kv_a_layernorm.weight)


def test_up_weights_are_views_of_kv_b_proj():
    cfg = cfg_for(None)
    m = build(cfg)
    w_uk, w_uv = m.up_weights()
    h, nope, vd, r = cfg.n_heads, 12, 10, 16
    assert w_uk.shape == (h, nope, r) and w_uv.shape == (h, vd, r)
    c = torch.randn(r)
    out = m.kv_b_proj(c).view(h, nope + vd)
    torch.testing.assert_close(out[:, :nope], w_uk @ c)
    torch.testing.assert_close(out[:, nope:], w_uv @ c)


def test_softmax_scale_with_yarn_mscale():
    assert mla_softmax_scale(cfg_for(None)) == pytest.approx(1 / math.sqrt(20))
    s = RopeScaling(type="yarn", factor=40.0, original_max_seq_len=64, mscale=0.707, mscale_all_dim=0.8)
    expected = 1 / math.sqrt(20) * (0.1 * 0.8 * math.log(40.0) + 1) ** 2
    assert mla_softmax_scale(cfg_for(None, rope_scaling=s)) == pytest.approx(expected)
