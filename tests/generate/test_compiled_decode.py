"""Generator(compile=True) and packed weights: the same tokens, logprobs, hidden states and probe scores as the eager
engine."""

from __future__ import annotations

import pytest
import torch
from test_engine import capture_hidden
from tiny_lm import random_probe, tiny_lm, tiny_model

from lucidlm.generate.compiled_steps import CompiledSteps
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.model.cpu_kernels import pack_linears, unpack_linears

PROMPTS = [[1, 5, 9, 2, 7, 3, 8], [4, 4, 1], [6, 2, 9, 9, 1]]
NEW = 10


def test_compiled_and_packed_decode_equal_eager():
    torch._dynamo.reset()
    model = tiny_model("llama-125m", seed=1, n_layers=2)
    config = GenerationConfig(max_new_tokens=NEW)
    eager = Generator(model).generate(PROMPTS, config)
    eos = eager[1].token_ids[2]  # row 1 stops after 3 tokens: the batch shrinks 3 -> 2 rows
    eager = Generator(model, eos_token_ids=[eos]).generate(PROMPTS, config)
    assert len(eager[1].token_ids) == 3

    probe, seen = capture_hidden(layer=0)
    compiled = Generator(model, eos_token_ids=[eos], compile=True, probe=probe).generate(PROMPTS, config)
    pack_linears(model)
    try:
        packed = Generator(model, eos_token_ids=[eos], compile=True).generate(PROMPTS, config)
    finally:
        unpack_linears(model)

    for i, e in enumerate(eager):
        assert compiled[i].token_ids == e.token_ids
        assert packed[i].token_ids == e.token_ids and packed[i].finish_reason == e.finish_reason
        torch.testing.assert_close(packed[i].logprobs, e.logprobs, atol=1e-4, rtol=0)
    steps = CompiledSteps.for_model(model)
    assert steps.ready and not steps.failed  # the steps ran compiled, none refused (then they would run eagerly)
    rows = [h.shape[0] for h in seen]  # filler rows are cut from the outputs the probe reads
    assert rows[0] == 3 and rows[-1] < 3  # shrank: other compiled shapes


def test_compiled_step_hidden_states_match_eager():
    torch._dynamo.reset()
    model = tiny_model("qwen3-0.6b", seed=2, n_layers=2)  # QK-norm
    config = GenerationConfig(max_new_tokens=4)
    probe, eager_seen = capture_hidden(layer=1)
    eager = Generator(model, probe=probe).generate([PROMPTS[0]], config)
    probe, compiled_seen = capture_hidden(layer=1)
    compiled = Generator(model, compile=True, probe=probe).generate([PROMPTS[0]], config)
    assert eager[0].token_ids == compiled[0].token_ids and len(eager_seen) == len(compiled_seen) == 4
    assert CompiledSteps.for_model(model).ready and not CompiledSteps.for_model(model).failed
    for a, b in zip(eager_seen, compiled_seen):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compiled_decode_scores_own_aligned_tokens_as_eager():
    """An "own" probe feeds finished rows once more: the compiled step (filler rows, static cache) gives the
    same tokens and the same scores, each equal to a full forward's."""
    torch._dynamo.reset()
    lm = tiny_lm()
    lm.probe = random_probe(lm, layer=1, alignment="own")
    prompts = ["hello", "a longer prompt", "xyz"]
    lm.hf_config = {"eos_token_id": lm.generate(prompts[1], max_new_tokens=NEW)[0].token_ids[2]}
    eager = lm.generate(prompts, max_new_tokens=NEW)
    assert len(eager[1].token_ids) == 3  # row 1 stops early: fed once more beside the others
    lm.compile_decode = True
    compiled = lm.generate(prompts, max_new_tokens=NEW)
    for p, e, c in zip(prompts, eager, compiled):
        assert c.token_ids == e.token_ids and c.finish_reason == e.finish_reason
        ids = lm.encode(p)
        full = lm.token_scores(ids + c.token_ids)[len(ids):]
        assert c.scores == pytest.approx(full, abs=1e-4) and e.scores == pytest.approx(full, abs=1e-5)


def test_compiled_moe_decode_equals_eager():
    """Routing picks each expert's tokens with torch.where (a size known only at run time): the step still compiles
    as one graph, and gives the eager tokens."""
    torch._dynamo.reset()
    model = tiny_model("mixtral-8x7b", seed=3, n_layers=1)
    config = GenerationConfig(max_new_tokens=6)
    eager = Generator(model).generate([PROMPTS[0]], config)
    compiled = Generator(model, compile=True).generate([PROMPTS[0]], config)
    assert compiled[0].token_ids == eager[0].token_ids
    steps = CompiledSteps.for_model(model)
    assert steps.ready and not steps.failed
