"""Norms against their formulas, and RMSNorm's float32 computation for half-precision inputs."""

import pytest
import torch

from lucidlm.config import ModelConfig
from lucidlm.model.norm import LayerNorm, RMSNorm, make_norm


def naive_rms(x, w, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def test_rmsnorm_equals_formula():
    n = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        n.weight.normal_()
    x = torch.randn(3, 5, 24) * 4
    torch.testing.assert_close(n(x).double(), naive_rms(x, n.weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert n(x).dtype == torch.float32


def test_rmsnorm_eps_matters_for_tiny_inputs():
    x = torch.full((1, 8), 1e-3)
    with torch.no_grad():
        out = RMSNorm(8, eps=1e-6)(x)
    torch.testing.assert_close(out.double(), naive_rms(x, torch.ones(8), 1e-6))
    assert float(out[0, 0]) < 0.9  # eps is inside the root: 1e-3 / sqrt(1e-6 + 1e-6) ≈ 0.707


def test_rmsnorm_unit_offset_scales_by_one_plus_weight():
    n = RMSNorm(16, eps=1e-6, unit_offset=True)
    assert torch.equal(n.weight, torch.zeros(16))  # identity at init
    with torch.no_grad():
        n.weight.normal_()
    x = torch.randn(4, 16)
    torch.testing.assert_close(n(x).double(), naive_rms(x, 1 + n.weight, 1e-6), rtol=1e-5, atol=1e-6)


def test_rmsnorm_is_computed_in_float32_for_bf16_input():
    torch.manual_seed(3)
    x = (torch.randn(64, 256) * 30 + 5).to(torch.bfloat16)
    for unit_offset in (False, True):
        n = RMSNorm(256, eps=1e-6, unit_offset=unit_offset).to(torch.bfloat16)
        with torch.no_grad():
            n.weight.normal_()
        out = n(x)
        assert out.dtype == torch.bfloat16
        x32, w32 = x.float(), n.weight.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        if unit_offset:  # Gemma: multiply in float32, then round once
            expected = (normed * (1 + w32)).to(torch.bfloat16)
        else:  # Llama: round the normalised value, multiply by the bf16 weight
            expected = n.weight * normed.to(torch.bfloat16)
        assert torch.equal(out, expected)
        # a bf16-only computation rounds differently: the test can tell the two apart
        naive16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        naive16 = naive16 * ((1 + n.weight) if unit_offset else n.weight)
        assert not torch.equal(out, naive16)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_formula(bias):
    n = LayerNorm(20, eps=1e-5, bias=bias)
    with torch.no_grad():
        n.weight.normal_()
        if bias:
            n.bias.normal_()
    x = torch.randn(3, 7, 20) * 3 + 2
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    expected = (xd - mean) / torch.sqrt(var + 1e-5) * n.weight.double()
    if bias:
        expected = expected + n.bias.double()
    torch.testing.assert_close(n(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_bf16_matches_float32_computation():
    x = (torch.randn(16, 128) * 20 + 50).to(torch.bfloat16)
    n = LayerNorm(128, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        n.weight.normal_()
        n.bias.normal_()
    out = n(x)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.layer_norm(x.float(), (128,), n.weight.float(), n.bias.float(), 1e-5)
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1e-2)  # within bf16 rounding of the output


def test_make_norm_follows_config():
    base = dict(dim=32, n_heads=2, vocab_size=8, n_layers=1, ffn_dim=8)
    rms = make_norm(ModelConfig(**base, norm_eps=1e-6, norm_unit_offset=True))
    assert isinstance(rms, RMSNorm) and rms.unit_offset and rms.eps == 1e-6
    ln = make_norm(ModelConfig(**base, norm="layernorm", norm_bias=False), dim=8)
    assert isinstance(ln, LayerNorm) and ln.bias is None and ln.normalized_shape == (8,)
