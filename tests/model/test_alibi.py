"""ALiBi: slopes equal BLOOM's reference, the bias is slope·(k − q), and it ranks keys like BLOOM's."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from lucidlm.model.alibi import alibi_bias, alibi_slopes


@pytest.mark.parametrize("n_heads", range(1, 21))
def test_slopes_equal_bloom(n_heads):
    ours = alibi_slopes(n_heads)
    assert ours.shape == (n_heads,)
    torch.testing.assert_close(ours, _get_alibi_slopes(n_heads, torch.device("cpu")), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_heads", [4, 8, 16])
def test_power_of_two_slopes_are_geometric_from_2_pow_minus_8_over_n(n_heads):
    expected = torch.tensor([2.0 ** (-8 * (i + 1) / n_heads) for i in range(n_heads)])
    torch.testing.assert_close(alibi_slopes(n_heads), expected)


def test_bias_is_slope_times_key_minus_query():
    slopes = alibi_slopes(6)
    q_pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # second row: left padding
    k_pos = q_pos
    bias = alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (2, 6, 5, 5)
    for b in range(2):
        for h in range(6):
            for i in range(5):
                for j in range(5):
                    expected = float(slopes[h]) * (int(k_pos[b, j]) - int(q_pos[b, i]))
                    assert float(bias[b, h, i, j]) == pytest.approx(expected, abs=1e-6)
    diag = torch.diagonal(bias, dim1=-2, dim2=-1)
    assert (diag == 0).all()
    lower = torch.ones(5, 5, dtype=torch.bool).tril(-1)
    assert (bias[0][:, lower] < 0).all()  # past keys are penalised
    assert (bias[0, :, 4, :4].diff(dim=-1) > 0).all()  # the further away, the more


def test_softmax_equals_bloom_alibi_under_causal_mask():
    """BLOOM adds slope·k_pos only; that differs by a per-query constant, so attention is the same."""
    n_heads, s = 5, 7
    mask = torch.ones(2, s, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = alibi_bias(alibi_slopes(n_heads), pos, pos)
    bloom = build_alibi_tensor(mask, n_heads, torch.float32).view(2, n_heads, 1, s)
    scores = torch.randn(2, n_heads, s, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    neg = torch.finfo(torch.float32).min

    def probs(bias):
        return (scores + bias).masked_fill(~causal, neg).softmax(-1)

    real = mask.bool()[:, None, :, None].expand(2, n_heads, s, s)
    torch.testing.assert_close(probs(ours)[real], probs(bloom)[real])
