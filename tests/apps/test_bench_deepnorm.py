"""`lucidlm bench --deepnorm` at a small size: the paper's claim holds (post-LN stays at chance, DeepNorm learns),
the post-LN baseline has the paper's init, and the table reports a diverged run as such."""

from __future__ import annotations

import math

import pytest
import torch

from lucidlm.apps.bench_deepnorm import PLACEMENTS, DeepNormBench, build_model, deepnorm_table, run_deepnorm_bench


def test_small_post_ln_stack_stays_at_chance_where_deepnorm_learns():
    bench = DeepNormBench(layers=8, steps=15, seeds=(0,))
    threads = torch.get_num_threads()
    result = run_deepnorm_bench(bench)
    assert torch.get_num_threads() == threads  # restored
    chance = math.log(bench.vocab)
    assert list(result) == list(PLACEMENTS)
    for curves in result.values():
        assert len(curves) == 1 and len(curves[0]) == bench.steps
        assert curves[0][0] == pytest.approx(chance, abs=0.1)  # every init starts at the uniform prediction
    post, deep = (sum(result[p][0][-5:]) / 5 for p in ("post", "deepnorm"))
    assert post > 0.9 * chance, result["post"]
    assert deep < 0.5 * chance, result["deepnorm"]
    table = deepnorm_table(result, bench)
    assert f"| DeepNorm (α, β) | {result['deepnorm'][0][0]:.2f} | {deep:.2f} |" in table


def test_post_ln_baseline_is_xavier_normal_with_gain_one():
    """The paper's Post-LN: every block matrix Xavier-normal, std = √(2 / (fan_in + fan_out))."""
    bench = DeepNormBench(layers=2, dim=64)
    model = build_model(bench, "post", torch.Generator().manual_seed(0))
    matrices = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert len(matrices) == 2 * 6  # q, k, v, o, up, down per block
    for name, w in matrices:
        fan_out, fan_in = w.shape
        assert w.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.08), name
    assert model.embed.weight.std().item() == pytest.approx(model.config.init_std, rel=0.08)  # not a block matrix


def test_table_names_where_a_run_diverged():
    bench = DeepNormBench(steps=6, seeds=(0, 1))
    result = {"post": [[4.2, 9.0, float("nan")], [4.1, 4.0, 3.9, 3.8, 3.7, 3.6]],
              "deepnorm": [[4.2] * 6, [4.0] * 6], "pre": [[4.2] * 6, [4.2] * 6]}
    rows = deepnorm_table(result, bench).splitlines()
    assert rows[-3] == "| post-LN (Xavier, gain 1) | 4.20 / 4.10 | NaN at step 3 / 3.80 | 3.60 |"
    assert rows[-1] == "| pre-LN | 4.20 / 4.20 | 4.20 / 4.20 | 4.20 |"
