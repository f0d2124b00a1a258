"""Compiled decode steps (generate/compiled_steps.py): built on first use with the eager engine's tokens; a step saved
to disk is loaded by another model of the same architecture without compiling, reads that model's weights (never a
copy) and follows changes to them; a step whose guards refuse a call falls back to eager."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.generate.compiled_steps import CompiledStepRefused, CompiledSteps, StepShape, artifact_key, as_mode
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.model.kv_cache import KVCache

PROMPTS = [[1, 5, 9, 2, 7], [4, 4, 1]]
CONFIG = GenerationConfig(max_new_tokens=8)


def _run(gen: Generator, prompts=PROMPTS):
    """The completions and the engine that produced them."""
    engine, seqs, events = gen.start(prompts, [(CONFIG, 0)])
    got: list[list] = [[] for _ in seqs]
    while engine.has_work():
        engine.step()
        while events:
            row, event = events.popleft()
            got[row].append(event.token_id)
    return got, engine


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-125m", seed=3, n_layers=2)


def test_steps_are_built_on_first_use_and_give_the_eager_tokens(model):
    eager, _ = _run(Generator(model))
    compiled, engine = _run(Generator(model, compile="on"))
    steps = CompiledSteps.for_model(model)
    assert compiled == eager and engine.compiled_steps == engine.steps > 0
    assert steps.ready and not steps.failed and steps.compiled + steps.loaded == len(steps.ready)


def test_a_saved_step_serves_another_model_of_the_architecture_with_its_own_current_weights(model):
    _run(Generator(model, compile="on"))  # its artefacts on disk
    other = tiny_model("llama-125m", seed=4, n_layers=2)  # other weights, same shapes: its artefact is on disk
    eager, _ = _run(Generator(other))
    compiled, engine = _run(Generator(other, compile="on"))
    steps = CompiledSteps.for_model(other)
    assert compiled == eager and engine.compiled_steps > 0
    assert steps.loaded >= 1 and steps.compiled == 0  # loaded, not compiled again

    with torch.no_grad():  # weights changed after compiling (an optimizer step, load_state_dict): no stale copy
        for p in other.parameters():
            if p.dim() >= 2:
                p.mul_(-1.0)
    eager, _ = _run(Generator(other))
    compiled, engine = _run(Generator(other, compile="on"))
    assert compiled == eager and engine.compiled_steps > 0


def test_preloading_loads_the_engines_shapes_on_disk_and_compiles_none(model):
    _run(Generator(model, compile="on"))  # the shapes these prompts step through are on disk
    on_disk = set(CompiledSteps.for_model(model).ready)
    other = tiny_model("llama-125m", seed=5, n_layers=2)
    longest = max(map(len, PROMPTS)) + CONFIG.max_new_tokens
    engine = Generator(other, compile="on").call_engine(len(PROMPTS), longest)  # the geometry _run's engine had
    assert engine.preload_compiled() == len(on_disk)  # those, and no other shape compiled
    steps = CompiledSteps.for_model(other)
    assert set(steps.ready) == on_disk and steps.compiled == 0
    assert engine.preload_compiled() == 0  # already in memory
    # and the loaded steps run (loaded outside inference mode, their guards once refused every step)
    eager, _ = _run(Generator(other))
    compiled, engine = _run(Generator(other, compile="on"))
    assert compiled == eager and engine.compiled_steps == engine.steps > 0 and not steps.failed
    assert Generator(other).call_engine(len(PROMPTS), longest).preload_compiled() == 0  # compile="off": none


def test_a_refused_step_falls_back_to_eager(model):
    gen = Generator(model, compile="on")
    eager, _ = _run(Generator(model))
    _run(gen)
    steps = CompiledSteps.for_model(model)

    def refusing(*args):
        raise CompiledStepRefused("guard failed")

    for shape in list(steps.ready):
        steps.ready[shape] = refusing
    try:
        got, engine = _run(gen)
        assert got == eager and steps.failed and not steps.ready and engine.compiled_steps == 0
    finally:
        steps.failed.clear()


def test_the_key_separates_what_the_graph_depends_on(model):
    shape = StepShape(slots=2, max_len=256, chunk=512, width=2, kv_len=256, layers=())
    key = artifact_key(model, shape)
    assert key == artifact_key(model, shape)
    assert key != artifact_key(model, StepShape(2, 256, 512, 1, 256, ()))
    assert key != artifact_key(model, StepShape(2, 256, 512, 2, 256, (1,)))
    assert key != artifact_key(tiny_model("llama-125m", n_layers=3), shape)
    assert key != artifact_key(tiny_model("llama-125m", n_layers=2).to(torch.bfloat16), shape)


def test_modes_are_checked():
    assert as_mode(True) == "on" and as_mode(False) == "off" and as_mode("on") == "on"
    with pytest.raises(ValueError, match="compile='fast'.*on, off"):
        as_mode("fast")


def test_a_lazy_cache_has_the_layout_of_a_zeroed_one(model):
    a = KVCache(model.config, 2, 64, static=True)
    b = KVCache(model.config, 2, 64, static=True, lazy=True)
    assert [tuple(t.shape) for p in a.layers for t in p] == [tuple(t.shape) for p in b.layers for t in p]
    assert all(bool((t == 0).all()) for p in a.layers for t in p)
