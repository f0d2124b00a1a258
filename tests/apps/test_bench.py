"""`lucidlm bench`'s runners on a tiny model: the "fast" lucidlm path runs in every dtype on any CPU (oneDNN packs
bfloat16 only with AVX-512; elsewhere "fast" is the compiled step alone) and gives the eager path's tokens."""

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
    fast_run = _ours_runner(lm, ids, fast=True)
    assert is_packed(lm.model.blocks[0].mlp.up_proj.weight) == packable(dtype)
    fast = fast_run(4)()
    if dtype == torch.float32:  # bfloat16 paths may part on near-ties (different summation orders)
        assert [c.token_ids for c in fast] == [c.token_ids for c in eager]
    assert [len(c.token_ids) for c in fast] == [4]
    prefill, decode, step = measure(fast_run, 1, 8, 4, 1)
    assert all(math.isfinite(x) and x > 0 for x in (prefill, decode, step))
