"""Attention against a naive softmax(QKᵀ·scale + bias, masked)·V written here, for MHA, GQA and MQA."""

import math

import pytest
import torch
import torch.nn.functional as F

from lucidlm.config import ModelConfig
from lucidlm.model.alibi import alibi_bias, alibi_slopes
from lucidlm.model.attention import Attention, attend
from lucidlm.model.masks import build_mask
from lucidlm.model.rope import RotaryEmbedding


def naive_attend(q, k, v, mask, scale, bias=None):
    """Explicit per-head loop; query head h reads K/V head h // (heads / kv_heads)."""
    b, h, s, _ = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, s, v.shape[-1], dtype=q.dtype)
    for head in range(h):
        kh, vh = k[:, head // group], v[:, head // group]
        scores = q[:, head] @ kh.transpose(-1, -2) * scale
        if bias is not None:
            scores = scores + bias[:, head]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        out[:, head] = scores.softmax(-1) @ vh
    return out


def naive_rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def naive_rope_half(x, cos, sin):
    cos = torch.cat([cos, cos], -1)[:, None]
    sin = torch.cat([sin, sin], -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def naive_module(m: Attention, cfg: ModelConfig, x, rope, mask, bias=None):
    b, s, _ = x.shape
    hd = cfg.head_dim
    q = (x @ m.q_proj.weight.T).view(b, s, cfg.n_heads, hd).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(b, s, cfg.n_kv_heads, hd).transpose(1, 2)
    v = (x @ m.v_proj.weight.T).view(b, s, cfg.n_kv_heads, hd).transpose(1, 2)
    if cfg.qk_norm:
        q = naive_rms(q, m.q_norm.weight, cfg.norm_eps)
        k = naive_rms(k, m.k_norm.weight, cfg.norm_eps)
    if rope is not None:
        q, k = naive_rope_half(q, *rope), naive_rope_half(k, *rope)
    scale = cfg.attn_scale or 1 / math.sqrt(hd)
    o = naive_attend(q, k, v, mask, scale, bias).transpose(1, 2).reshape(b, s, -1)
    if cfg.attn_gate:
        o = o * torch.sigmoid(x @ m.gate_proj.weight.T)
    return o @ m.o_proj.weight.T


def cfg_for(**kw) -> ModelConfig:
    base = dict(dim=32, n_heads=4, n_kv_heads=4, vocab_size=16, n_layers=1, ffn_dim=32, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)  # norm weights too, so a dropped weight would show
    return module.double()


def rope_for(cfg, s, b=2):
    rot = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    return rot(torch.arange(s).expand(b, s), torch.float64)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attend_equals_naive(kv_heads, with_bias):
    b, h, s, d = 2, 4, 6, 8
    q = torch.randn(b, h, s, d, dtype=torch.float64)
    k = torch.randn(b, kv_heads, s, d, dtype=torch.float64)
    v = torch.randn(b, kv_heads, s, 5, dtype=torch.float64)
    pad = torch.tensor([[1] * s, [0, 0] + [1] * (s - 2)])
    mask = build_mask(s, s, batch=b, key_padding=pad)
    bias = torch.randn(b, h, s, s, dtype=torch.float64) if with_bias else None
    out = attend(q, k, v, mask, 0.37, bias)
    torch.testing.assert_close(out, naive_attend(q, k, v, mask, 0.37, bias))


def test_attend_with_bias_and_no_mask():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    bias = alibi_bias(alibi_slopes(2), torch.arange(5)[None], torch.arange(5)[None]).double()
    torch.testing.assert_close(attend(q, k, v, None, 0.5, bias), naive_attend(q, k, v, None, 0.5, bias))


CASES = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "qk_norm": dict(n_kv_heads=2, qk_norm=True),
    "attn_gate": dict(n_kv_heads=2, attn_gate=True),
    "both": dict(qk_norm=True, attn_gate=True, attn_scale=0.05),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_equals_naive(case):
    cfg = cfg_for(**CASES[case])
    m = randomized(Attention(cfg))
    x = torch.randn(2, 7, cfg.dim, dtype=torch.float64)
    rope = rope_for(cfg, 7)
    mask = build_mask(7, 7, batch=2, key_padding=torch.tensor([[1] * 7, [0] + [1] * 6]))
    torch.testing.assert_close(m(x, rope, mask), naive_module(m, cfg, x, rope, mask))


def test_module_with_alibi_bias_and_no_rope_equals_naive():
    cfg = cfg_for(n_kv_heads=2, positions="alibi")
    m = randomized(Attention(cfg))
    x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
    pos = torch.arange(5).expand(2, 5)
    bias = alibi_bias(alibi_slopes(cfg.n_heads), pos, pos).double()
    mask = build_mask(5, 5, batch=2)
    torch.testing.assert_close(m(x, None, mask, bias), naive_module(m, cfg, x, None, mask, bias))


@pytest.mark.parametrize("option", ["qk_norm", "attn_gate"])
def test_options_change_the_output(option):
    plain_cfg, opt_cfg = cfg_for(n_kv_heads=2), cfg_for(n_kv_heads=2, **{option: True})
    plain = randomized(Attention(plain_cfg))
    opt = randomized(Attention(opt_cfg))
    opt.load_state_dict(plain.state_dict(), strict=False)  # same q/k/v/o weights
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    rope, mask = rope_for(plain_cfg, 6, b=1), build_mask(6, 6)
    assert not torch.allclose(plain(x, rope, mask), opt(x, rope, mask), atol=1e-3)


def test_gqa_equals_mha_with_kv_heads_repeated_per_group():
    gqa_cfg, mha_cfg = cfg_for(n_heads=6, n_kv_heads=2, dim=48), cfg_for(n_heads=6, n_kv_heads=6, dim=48)
    gqa = randomized(Attention(gqa_cfg))
    mha = Attention(mha_cfg).double()
    hd, group = gqa_cfg.head_dim, 3
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, hd, -1)  # (kv_heads, hd, dim)
            # query head h uses kv head h // group: kv head j is copied to heads j*group .. j*group+group-1
            getattr(mha, name).weight.copy_(torch.cat([w[h // group] for h in range(6)]))
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    rope, mask = rope_for(gqa_cfg, 5), build_mask(5, 5, batch=2)
    torch.testing.assert_close(gqa(x, rope, mask), mha(x, rope, mask))
    assert gqa.k_proj.weight.numel() * 3 == mha.k_proj.weight.numel()  # the KV cache is 3x smaller


def test_gqa_with_kv_heads_equal_to_heads_is_exactly_mha():
    default = ModelConfig(dim=32, n_heads=4, vocab_size=16, n_layers=1, ffn_dim=32)
    assert default.n_kv_heads == 4
    a = randomized(Attention(default))
    b = Attention(cfg_for(n_kv_heads=4)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    rope, mask = rope_for(default, 6, b=1), build_mask(6, 6)
    assert torch.equal(a(x, rope, mask), b(x, rope, mask))
    # with as many kv heads as query heads there is no sharing: each head is independent attention
    torch.testing.assert_close(a(x, rope, mask), naive_module(a, default, x, rope, mask))


def test_causal_mask_blocks_the_future():
    cfg = cfg_for(n_kv_heads=2)
    m = randomized(Attention(cfg))
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    rope, mask = rope_for(cfg, 6, b=1), build_mask(6, 6)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 32, dtype=torch.float64)
    out_x, out_y = m(x, rope, mask), m(y, rope, mask)
    assert torch.equal(out_x[:, :4], out_y[:, :4])
    assert not torch.allclose(out_x[:, 4:], out_y[:, 4:])


@pytest.mark.parametrize("n_kv_heads", [6, 2, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_one_query_attention_equals_sdpa(n_kv_heads, with_bias):
    """The decode-step formula (two matmuls, float32 softmax, grouped heads) equals SDPA."""
    from lucidlm.model.cpu_kernels import attend_one_query

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 16, generator=g)
    k, v = torch.randn(2, 3, n_kv_heads, 20, 16, generator=g)
    mask = torch.rand(3, 1, 1, 20, generator=g) > 0.4
    mask[..., -1] = True
    bias = torch.randn(3, 6, 1, 20, generator=g) if with_bias else None
    additive = torch.zeros(3, 6, 1, 20) if bias is None else bias
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=additive.masked_fill(~mask, float("-inf")),
                                              scale=0.3, enable_gqa=n_kv_heads != 6)
    torch.testing.assert_close(attend_one_query(q, k, v, mask, 0.3, bias), expected, rtol=1e-5, atol=1e-6)
    # attend() takes this path for bfloat16 decode steps on CPU
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3, bias)
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)
