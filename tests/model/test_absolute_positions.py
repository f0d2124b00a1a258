"""Absolute positions: the sinusoidal table is Vaswani et al.'s formula; learned ones are a lookup."""

import math

import pytest
import torch

from lucidlm.model.absolute_positions import LearnedPositions, SinusoidalPositions, sinusoidal_table


@pytest.mark.parametrize("dim", [8, 64, 7])
def test_sinusoidal_table_equals_vaswani_formula(dim):
    n = 50
    table = sinusoidal_table(n, dim)
    assert table.shape == (n, dim)
    expected = torch.zeros(n, dim, dtype=torch.float64)
    for p in range(n):
        for c in range(dim):
            i = c // 2
            angle = p / 10000 ** (2 * i / dim)
            expected[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=2e-5)


def test_sinusoidal_module_looks_up_rows_by_position():
    mod = SinusoidalPositions(32, 16)
    pos = torch.tensor([[0, 1, 2, 3], [0, 0, 5, 31]])
    out = mod(pos)
    table = sinusoidal_table(32, 16)
    for b in range(2):
        for s in range(4):
            torch.testing.assert_close(out[b, s], table[pos[b, s]])
    assert "table" not in mod.state_dict()  # fixed, never saved


def test_learned_positions_are_an_embedding_lookup():
    mod = LearnedPositions(10, 6)
    torch.nn.init.normal_(mod.weight)
    pos = torch.tensor([[0, 3, 9], [2, 2, 1]])
    out = mod(pos)
    assert out.shape == (2, 3, 6)
    for b in range(2):
        for s in range(3):
            assert torch.equal(out[b, s], mod.weight[pos[b, s]])
    out.sum().backward()
    counts = torch.bincount(pos.flatten(), minlength=10).float()
    torch.testing.assert_close(mod.weight.grad, counts[:, None].expand(10, 6))  # only looked-up rows learn
