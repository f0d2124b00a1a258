"""RoPE: relative-position property, norm preservation, layouts, and every scaling variant's
frequencies against transformers' ``ROPE_INIT_FUNCTIONS``."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lucidlm.config import RopeScaling
from lucidlm.model.rope import RotaryEmbedding, apply_rope, base_inv_freq, rope_inv_freq

DIM = 32
THETA = 10000.0


def rotate(x: torch.Tensor, positions: list[int], interleaved: bool, scaling: RopeScaling | None = None):
    """x: (1, heads, len(positions), DIM) rotated by the module under test."""
    rotary = RotaryEmbedding(DIM, THETA, scaling or RopeScaling(), max_seq_len=4096)
    cos, sin = rotary(torch.tensor([positions]), torch.float64)
    return apply_rope(x.double(), cos, sin, interleaved=interleaved)


def naive_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotation as complex multiplication: pair (a, b) -> (a + ib)·e^{i·pos·freq}."""
    x = x.double()
    d = x.shape[-1]
    if interleaved:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    angle = positions.double()[:, None] * inv_freq.double()[None, :]  # (seq, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_equals_complex_multiplication(interleaved):
    x = torch.randn(2, 3, 7, DIM)
    pos = torch.tensor([0, 1, 2, 5, 9, 100, 1000])
    rotary = RotaryEmbedding(DIM, THETA, RopeScaling(), 4096)
    cos, sin = rotary(pos.expand(2, -1), torch.float64)
    out = apply_rope(x.double(), cos, sin, interleaved=interleaved)
    # angles are computed in float32 (as in the reference implementations): ~1e-4 at position 1000
    torch.testing.assert_close(out, naive_rope(x, pos, base_inv_freq(DIM, THETA), interleaved), rtol=0, atol=2e-4)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling(type="yarn", factor=4.0, original_max_seq_len=512),
                                     RopeScaling(type="llama3", factor=8.0, original_max_seq_len=256)])
def test_dot_product_depends_only_on_relative_offset(interleaved, scaling):
    q = torch.randn(1, 1, 1, DIM).double()
    k = torch.randn(1, 1, 1, DIM).double()

    def score(m: int, n: int) -> float:
        qm = rotate(q, [m], interleaved, scaling)
        kn = rotate(k, [n], interleaved, scaling)
        return float((qm * kn).sum())

    for offset in (0, 1, 3, 17):
        ref = score(offset, 0)
        for start in (1, 5, 40, 333):
            assert score(start + offset, start) == pytest.approx(ref, rel=1e-5, abs=1e-5)  # float32 angles
    # different offsets give different scores
    scores = [score(10 + off, 10) for off in (0, 1, 2, 5, 13)]
    assert len({round(s, 6) for s in scores}) == len(scores)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_preserves_norm(interleaved):
    x = torch.randn(2, 4, 9, DIM)
    out = rotate(x[:1], list(range(0, 900, 100)), interleaved)
    torch.testing.assert_close(out.norm(dim=-1), x[:1].double().norm(dim=-1))
    assert not torch.allclose(out[..., 1:, :], x[:1, :, 1:].double())  # it did rotate


def test_position_zero_is_identity():
    x = torch.randn(1, 2, 1, DIM)
    torch.testing.assert_close(rotate(x, [0], False), x.double())


def test_interleaved_equals_half_after_permuting_channels():
    x = torch.randn(2, 3, 6, DIM)
    perm = torch.cat([torch.arange(0, DIM, 2), torch.arange(1, DIM, 2)])  # evens then odds
    positions = [0, 3, 7, 11, 50, 200]
    inter = rotate(x, positions, interleaved=True)
    half = rotate(x[..., perm], positions, interleaved=False)
    torch.testing.assert_close(inter[..., perm], half)
    assert not torch.allclose(inter, rotate(x, positions, interleaved=False))


def test_base_inv_freq_formula():
    expected = torch.tensor([THETA ** (-2 * i / DIM) for i in range(DIM // 2)], dtype=torch.float32)
    torch.testing.assert_close(base_inv_freq(DIM, THETA), expected)


# --- scaling variants against transformers -----------------------------------------------------
def hf_rope(rope_type: str, max_pos: int = 4096, seq_len: int | None = None, **params):
    cfg = LlamaConfig(hidden_size=2 * DIM, num_attention_heads=2, head_dim=DIM, max_position_embeddings=max_pos,
                      rope_parameters=dict(rope_type=rope_type, rope_theta=THETA, **params))
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, None, **kwargs)


def assert_same(ours, theirs):
    inv, att = ours
    hf_inv, hf_att = theirs
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert att == pytest.approx(float(hf_att), rel=1e-9)


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_linear_matches_transformers(factor):
    ours = rope_inv_freq(DIM, THETA, RopeScaling(type="linear", factor=factor))
    assert_same(ours, hf_rope("linear", factor=factor))


@pytest.mark.parametrize("seq_len", [100, 512, 700, 5000])
def test_dynamic_matches_transformers(seq_len):
    s = RopeScaling(type="dynamic", factor=4.0, original_max_seq_len=512)
    ours = rope_inv_freq(DIM, THETA, s, seq_len=seq_len)
    assert_same(ours, hf_rope("dynamic", max_pos=512, seq_len=seq_len, factor=4.0))


def test_dynamic_rotary_recomputes_frequencies_for_long_inputs():
    s = RopeScaling(type="dynamic", factor=4.0, original_max_seq_len=64)
    rotary = RotaryEmbedding(DIM, THETA, s, max_seq_len=64)
    short = torch.arange(50)[None]
    cos, _ = rotary(short, torch.float32)
    torch.testing.assert_close(cos, (short[..., None].float() * base_inv_freq(DIM, THETA)).cos())
    long = torch.arange(300)[None]
    cos, sin = rotary(long, torch.float32)
    hf_inv, _ = hf_rope("dynamic", max_pos=64, seq_len=300, factor=4.0)
    angles = long[..., None].float() * hf_inv.float()
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())


YARN_CASES = {
    "plain": dict(factor=8.0),
    "mscale": dict(factor=40.0, mscale=0.707, mscale_all_dim=0.707),
    "mscale_differs": dict(factor=16.0, mscale=1.0, mscale_all_dim=0.5),
    "attention_factor": dict(factor=4.0, attention_factor=0.9),
    "beta": dict(factor=8.0, beta_fast=16.0, beta_slow=2.0),
    "no_truncate": dict(factor=8.0, truncate=False),
    "ramp_past_half_dim": dict(factor=4.0, original=65536),  # high correction dim > DIM/2: the clamp matters
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_matches_transformers(case):
    params = dict(YARN_CASES[case])
    original = params.pop("original", 512)
    s = RopeScaling(type="yarn", original_max_seq_len=original, **params)
    ours = rope_inv_freq(DIM, THETA, s)
    assert_same(ours, hf_rope("yarn", max_pos=4 * original, original_max_position_embeddings=original, **params))
    assert not torch.allclose(ours[0], base_inv_freq(DIM, THETA))


def test_yarn_attention_factor_scales_cos_and_sin():
    s = RopeScaling(type="yarn", factor=8.0, original_max_seq_len=512)
    rotary = RotaryEmbedding(DIM, THETA, s, 4096)
    inv, att = hf_rope("yarn", original_max_position_embeddings=512, factor=8.0)
    assert att == pytest.approx(0.1 * math.log(8.0) + 1)
    pos = torch.arange(20)[None]
    cos, sin = rotary(pos, torch.float32)
    torch.testing.assert_close(cos, (pos[..., None] * inv).cos() * att)
    torch.testing.assert_close(sin, (pos[..., None] * inv).sin() * att)


@pytest.mark.parametrize("params", [dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
                                    dict(factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0)])
def test_llama3_matches_transformers(params):
    s = RopeScaling(type="llama3", original_max_seq_len=256, **params)
    ours = rope_inv_freq(DIM, 500000.0, s)
    cfg = LlamaConfig(hidden_size=2 * DIM, num_attention_heads=2, head_dim=DIM, max_position_embeddings=4096,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                           original_max_position_embeddings=256, **params))
    theirs = ROPE_INIT_FUNCTIONS["llama3"](cfg, None)
    assert_same(ours, theirs)
    base = base_inv_freq(DIM, 500000.0)
    assert (ours[0] < base).any() and (ours[0] == base).any()  # some bands scaled, the fastest kept


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_ntk_is_closed_form_base_change(factor):
    inv, att = rope_inv_freq(DIM, THETA, RopeScaling(type="ntk", factor=factor))
    new_base = THETA * factor ** (DIM / (DIM - 2))
    expected = torch.tensor([new_base ** (-2 * i / DIM) for i in range(DIM // 2)], dtype=torch.float64)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)
    assert att == 1.0
    assert inv[0] == 1.0 and inv[-1] < base_inv_freq(DIM, THETA)[-1]


# --- NTK-by-parts against the YaRN paper's formulas (Peng et al. 2023, §3.2) ----------------------
def paper_ntk_by_parts(dim: int, theta: float, factor: float, trained: int, alpha: float, beta: float) -> list[float]:
    """h(θ_d) = (1 − γ(r))·θ_d/s + γ(r)·θ_d, r = L/λ_d, λ_d = 2π/θ_d, γ the ramp from α to β; one channel at a time."""
    out = []
    for d in range(dim // 2):
        freq = theta ** (-2 * d / dim)
        r = trained / (2 * math.pi / freq)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        out.append((1 - gamma) * freq / factor + gamma * freq)
    return out


@pytest.mark.parametrize("dim,trained,factor,alpha,beta", [(DIM, 256, 8.0, 1.0, 32.0), (64, 4096, 4.0, 1.0, 32.0),
                                                           (DIM, 512, 2.0, 2.0, 16.0)])
def test_ntk_by_parts_matches_the_paper(dim, trained, factor, alpha, beta):
    s = RopeScaling(type="ntk_by_parts", factor=factor, original_max_seq_len=trained, beta_fast=beta, beta_slow=alpha)
    inv, att = rope_inv_freq(dim, THETA, s)
    expected = torch.tensor(paper_ntk_by_parts(dim, THETA, factor, trained, alpha, beta), dtype=torch.float64)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)
    assert att == 1.0  # no temperature: that is YaRN's addition
    base = base_inv_freq(dim, THETA).double()
    kept, divided = torch.isclose(inv.double(), base), torch.isclose(inv.double(), base / factor)
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three regimes are exercised


def test_ntk_by_parts_through_the_rotary_module_and_config():
    from lucidlm.config import ModelConfig

    s = RopeScaling(type="ntk_by_parts", factor=4.0)
    rotary = RotaryEmbedding(DIM, THETA, s, max_seq_len=256)  # original length defaults to the context
    expected = torch.tensor(paper_ntk_by_parts(DIM, THETA, 4.0, 256, 1.0, 32.0), dtype=torch.float32)
    torch.testing.assert_close(rotary.inv_freq, expected)
    with pytest.raises(ValueError, match="beta_fast > beta_slow"):
        ModelConfig(rope_scaling=dict(type="ntk_by_parts", factor=2.0, beta_fast=1.0, beta_slow=1.0))


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_without_temperature_equals_ntk_by_parts_only_outside_the_ramp(truncate):
    """transformers' YaRN (and lucidlm's, equal to it above) ramps linearly in the channel index d between the
    channels where r = β and r = α; the paper's NTK-by-parts ramps linearly in r = L/λ_d. With the temperature set
    to 1 they agree on which channels are kept and which divided by the factor (rounding the range to whole
    channels, ``truncate``, moves no integer channel across it) but not inside the ramp."""
    params = dict(factor=8.0, original_max_seq_len=512)
    yarn, att = rope_inv_freq(DIM, THETA, RopeScaling(type="yarn", attention_factor=1.0, truncate=truncate, **params))
    parts, _ = rope_inv_freq(DIM, THETA, RopeScaling(type="ntk_by_parts", **params))
    assert att == 1.0
    base = base_inv_freq(DIM, THETA)
    outside = torch.isclose(parts, base) | torch.isclose(parts, base / 8.0)
    torch.testing.assert_close(yarn[outside], parts[outside], rtol=1e-6, atol=0)
    assert outside.any() and (~outside).any()
    assert not torch.allclose(yarn[~outside], parts[~outside], rtol=1e-3, atol=0)
