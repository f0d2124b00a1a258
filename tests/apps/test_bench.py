"""`lucidlm bench`'s runners on a tiny model: the "packed" lucidlm path runs in every dtype on any CPU (oneDNN packs
bfloat16 only with AVX-512; elsewhere "packed" is the compiled step alone), the "default" one reports what building
its compiled steps took, and both give the eager path's tokens."""

from __future__ import annotations

import math

import pytest
import torch

from lucidlm.apps.bench import OVERHEAD_BOUND, _ours_runner, _random_ids, build_pair, measure
from lucidlm.model.cpu_kernels import is_packed, packable

TINY = dict(OVERHEAD_BOUND, num_hidden_layers=2, vocab_size=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_runner_runs_on_this_cpu_and_packs_only_where_it_can(dtype, tmp_path):
    torch._dynamo.reset()
    _, lm = build_pair(TINY, tmp_path, dtype)
    ids = _random_ids(TINY["vocab_size"], 1, 8)
    eager = _ours_runner(lm, ids)(4)()
    fast_run = _ours_runner(lm, ids, "packed")
    assert is_packed(lm.model.blocks[0].mlp.up_proj.weight) == packable(dtype)
    fast = fast_run(4)()
    if dtype == torch.float32:  # bfloat16 paths may part on near-ties (different summation orders)
        assert [c.token_ids for c in fast] == [c.token_ids for c in eager]
    assert [len(c.token_ids) for c in fast] == [4]
    prefill, decode, step = measure(fast_run, 1, 8, 4, 1)
    assert math.isfinite(prefill) and prefill > 0
    assert not decode <= 0 and not step <= 0  # a tiny model's step can drown in a busy machine's noise: NaN


@pytest.mark.parametrize("times, expected", [((2.0, 5.0), (8 * 16 / 2.0, 8 / 1.0, 1.0)),
                                             ((2.0, 1.5), (8 * 16 / 2.0, math.nan, math.nan))])
def test_measure_takes_the_decode_step_from_the_two_medians(times, expected, monkeypatch):
    """step = (t(new) − t(1)) / (new − 1); a difference the noise made negative is no rate at all."""
    import lucidlm.apps.bench as bench

    medians = iter(times)
    monkeypatch.setattr(bench, "_median_time", lambda fn, repeats: next(medians))
    got = bench.measure(lambda n: None, batch=8, prompt=16, new=4, repeats=1)
    assert got == pytest.approx(expected, nan_ok=True)


def test_default_runner_reports_building_its_compiled_steps(tmp_path):
    torch._dynamo.reset()
    _, lm = build_pair(TINY, tmp_path, torch.float32)
    ids = _random_ids(TINY["vocab_size"], 1, 8)
    eager = _ours_runner(lm, ids)(4)()
    ready = {"new": 4}
    default = _ours_runner(lm, ids, "default", ready)(4)()
    assert [c.token_ids for c in default] == [c.token_ids for c in eager]
    assert ready["seconds"] > 0 and ready["load_seconds"] > 0 and ready["compiled"] + ready["loaded"] >= 1
