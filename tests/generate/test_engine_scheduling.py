"""The engine's scheduling: a long prompt prefilled in chunks between decode steps, prefix caching, and the n
choices of one request sharing one prefill — each against generation alone (a fresh engine, nothing shared)."""

from __future__ import annotations

import pytest
import torch
from test_engine import capture_hidden
from tiny_lm import tiny_model

from lucidlm.generate.engine import Engine, StepClock
from lucidlm.generate.events import TokenEvent
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.prefix_cache import PrefixCache
from lucidlm.generate.sequence import Sequence


def rand_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def collect(prompt: list[int], config: GenerationConfig) -> tuple[Sequence, list[TokenEvent]]:
    events: list[TokenEvent] = []
    return Sequence(prompt, config, events.append), events


def alone(model, prompt: list[int], config: GenerationConfig):
    return Generator(model).generate([prompt], config)[0]


def test_a_long_prompt_admitted_mid_stream_is_prefilled_between_decode_steps():
    model = tiny_model()
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    engine = Engine(model, max_batch=4, max_len=256, prefill_chunk=16)
    short = [collect(rand_prompt(5 + i, i), config) for i in range(2)]
    engine.add([[s] for s, _ in short])
    for _ in range(3):
        engine.step()
    engine.clock.prefill_budget = lambda floor, share: 24  # what a share of a decode step buys (StepClock)
    engine.short_prompt = 100  # the 120-token prompt is a long one here
    long_seq, long_events = collect(rand_prompt(120, 9), config)
    engine.add([[long_seq]])
    produced = []  # tokens the running rows got per step while the long prompt was being prefilled
    while engine.jobs or engine.waiting:
        before = sum(len(e) for _, e in short)
        engine.step()
        produced.append(sum(len(e) for _, e in short) - before)
    # a decode step's worth of positions per step (here 24: one 16-position chunk and 8 more), the running rows
    # decoding at every step
    assert produced == [2] * 5
    assert engine.clock.decode_seconds > 0 and engine.clock.prefill_rate > 0
    while engine.has_work():
        engine.step()
    for seq, events in [*short, (long_seq, long_events)]:
        expected = alone(model, seq.prompt, config)
        assert [e.token_id for e in events] == expected.token_ids
        assert [e.logprob for e in events] == pytest.approx(expected.logprobs, abs=1e-4)


def test_a_short_prompt_admitted_mid_stream_is_prefilled_whole_in_one_step():
    model = tiny_model()
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    engine = Engine(model, max_batch=4, max_len=256, prefill_chunk=16)
    running, running_events = collect(rand_prompt(6, 1), config)
    engine.add([[running]])
    engine.step()
    engine.clock.prefill_budget = lambda floor, share: 1  # a long prompt would get one position per step
    short, short_events = collect(rand_prompt(40, 2), config)  # <= short_prompt: runs whole (3 chunks) at once
    engine.add([[short]])
    engine.step()
    assert not engine.jobs and len(engine.running) == 2 and len(short_events) == 1
    while engine.has_work():
        engine.step()
    for seq, events in [(running, running_events), (short, short_events)]:
        assert [e.token_id for e in events] == alone(model, seq.prompt, config).token_ids


def test_the_step_clock_budgets_what_one_decode_step_costs():
    clock = StepClock(torch.device("cpu"))
    assert clock.prefill_budget(16) == 16  # nothing measured yet
    clock.decoded(clock.start() - 0.05)  # a 50 ms decode step
    clock.prefilled(clock.start() - 0.5, 1000)  # 1000 positions in 0.5 s: 2000 per second
    assert clock.prefill_budget(16) == pytest.approx(100, abs=1)  # 50 ms buys 100 positions
    assert clock.prefill_budget(16, share=0.5) == pytest.approx(50, abs=1)
    clock.decoded(clock.start() - 0.15)  # smoothed: 0.8 · 50 + 0.2 · 150 = 70 ms
    assert clock.decode_seconds == pytest.approx(0.07, abs=2e-3)


def test_prefix_cached_prefill_gives_the_logits_of_a_full_prefill():
    """Three requests share a 40-token head: the first (padded beside a longer prompt in its prefill) stores it,
    the next two reuse 32 tokens of it (blocks of 8, one token always left to run): same tokens and logprobs as
    alone, and their first step's whole distribution equals a full prefill's."""
    model = tiny_model()
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    head = rand_prompt(40, 1)
    prompts = [head + rand_prompt(3, 2), head[:33], head + rand_prompt(20, 3)]
    engine = Engine(model, max_batch=4, max_len=256)
    engine.prefix_cache = PrefixCache(max_bytes=2**24, block=8)
    other = collect(rand_prompt(60, 4), config)
    first = collect(prompts[0], config)
    engine.add([[other[0]], [first[0]]])  # prefilled together: the shared prompt sits after 17 padding cells
    engine.step()
    later = [collect(p, GenerationConfig(max_new_tokens=12, ignore_eos=True)) for p in prompts[1:]]
    for seq, _ in later:
        seq.top_logprobs = 256  # the whole distribution of every step
        engine.add([[seq]])
        engine.step()  # admitted and prefilled from the cached head
        while engine.has_work():
            engine.step()
    assert engine.prefix_cache.hits == 2 and engine.prefix_cache.tokens_saved == 32 + 40
    for seq, events in [first, other, *later]:
        expected = alone(model, seq.prompt, config)
        assert [e.token_id for e in events] == expected.token_ids
        assert [e.logprob for e in events] == pytest.approx(expected.logprobs, abs=1e-5)
    for seq, events in later:
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([seq.prompt]))[0, -1].float(), -1)
        top = dict(events[0].top_logprobs)
        torch.testing.assert_close(torch.tensor([top[t] for t in range(256)]), full, atol=1e-5, rtol=0)


def test_prefix_cache_evicts_least_recently_used_past_its_bytes():
    cells = [(torch.zeros(1, 8, 4), torch.zeros(1, 8, 4))]  # one layer, K and V of 8 tokens: 256 bytes
    cache = PrefixCache(max_bytes=600, block=8)
    for i in range(3):
        cache.store([i] * 9, cells)
    assert cache.nbytes == 512 and cache.match([0] * 9) is None  # the first was evicted for the third
    assert cache.match([1] * 9 + [5]) is not None and cache.match([3] * 9) is None


def test_the_n_choices_of_a_request_share_one_prefill():
    model = tiny_model()
    probe, seen = capture_hidden(layer=0)
    config = GenerationConfig.from_kwargs(max_new_tokens=6, temperature=1.0, seed=3)
    got = Generator(model, probe=probe).generate([rand_prompt(10, 5)], config, n=3)
    assert seen[0].shape[0] == 1 and seen[1].shape[0] == 3  # the prefill ran one row; decode ran the three
    for j, c in enumerate(got):  # choice j draws with seed + j, as alone
        one = Generator(model).generate([rand_prompt(10, 5)], GenerationConfig.from_kwargs(
            max_new_tokens=6, temperature=1.0, seed=3 + j))[0]
        assert c.token_ids == one.token_ids


def test_a_group_is_the_choices_of_one_prompt():
    engine = Engine(tiny_model(), max_batch=4, max_len=64)
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="share one prompt"):
        engine.add([[collect([1, 2, 3], config)[0], collect([1, 2, 4], config)[0]]])
    with pytest.raises(ValueError, match="exceed the engine's batch of 4"):
        engine.add([[collect([1, 2, 3], config)[0] for _ in range(5)]])
    with pytest.raises(ValueError, match="exceed the context of 64"):
        engine.add([[collect([1] * 60, GenerationConfig(max_new_tokens=10))[0]]])
    assert not engine.has_work()  # nothing was queued
