"""Feed-forward networks against their formulas: SwiGLU / GeGLU and plain GELU / ReLU MLPs."""

import math

import pytest
import torch

from lucidlm.config import ModelConfig
from lucidlm.model.mlp import MLP, activation_fn

NAIVE_ACT = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: x.clamp(min=0),
}


def build(activation, gated, bias):
    cfg = ModelConfig(dim=16, n_heads=2, vocab_size=8, n_layers=1, ffn_dim=40, activation=activation,
                      gated_mlp=gated, mlp_bias=bias)
    mlp = MLP(cfg)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    return mlp.double()


def lin(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


@pytest.mark.parametrize("activation", sorted(NAIVE_ACT))
def test_activation_equals_formula(activation):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(activation_fn(activation)(x), NAIVE_ACT[activation](x))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_equals_formula(activation, bias):
    """SwiGLU (silu) / GeGLU (gelu): down(act(gate(x)) * up(x))."""
    mlp = build(activation, gated=True, bias=bias)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = lin(NAIVE_ACT[activation](lin(x, mlp.gate_proj)) * lin(x, mlp.up_proj), mlp.down_proj)
    torch.testing.assert_close(mlp(x), expected)
    assert (mlp.up_proj.bias is not None) == bias


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_plain_mlp_equals_formula(activation, bias):
    """down(act(up(x))), no gate matrix."""
    mlp = build(activation, gated=False, bias=bias)
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), lin(NAIVE_ACT[activation](lin(x, mlp.up_proj)), mlp.down_proj))


def test_hidden_width_override():
    cfg = ModelConfig(dim=16, n_heads=2, vocab_size=8, n_layers=1, ffn_dim=40)
    mlp = MLP(cfg, hidden_dim=12)
    assert mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features == 12


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown activation"):
        activation_fn("swish")
