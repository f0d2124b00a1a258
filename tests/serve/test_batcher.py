"""Continuous batching: rows that join and leave the running batch get exactly what they would get alone
(the engine's lm.generate / lm.stream is the reference; `lm` is conftest's probed tiny model, "own" alignment);
probe scores equal a full forward's at either alignment, however a row ends; cancelled rows free their slot at
once; the queue is bounded."""

from __future__ import annotations

import queue

import pytest
import torch
from live_server import probed_tiny_lm
from waiting import HANG_GUARD

from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.model.quantize import quantize_model
from lucidlm.serve.batcher import ContinuousBatcher, Draining, ErrorEvent, QueueFull, Sequence, TokenEvent


class Collector:
    def __init__(self):
        self.events: list[TokenEvent | ErrorEvent] = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def done(self) -> bool:
        return bool(self.events) and (isinstance(self.events[-1], ErrorEvent) or self.events[-1].finish_reason)

    @property
    def ids(self) -> list[int]:
        return [e.token_id for e in self.events]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def request(lm, prompt: str, n: int = 1, top_logprobs: int = 0, **options):
    config = GenerationConfig.from_kwargs(**options)
    sinks = [Collector() for _ in range(n)]
    seqs = [Sequence(lm.encode(prompt), config, sinks[j], top_logprobs=top_logprobs, sample_index=j)
            for j in range(n)]
    return seqs, sinks


def run_until_done(batcher, sinks, limit=500):
    with torch.inference_mode():
        for _ in range(limit):
            if all(s.done for s in sinks):
                return
            batcher.iteration()
    raise AssertionError("sequences did not finish")


PROMPTS = ["Hello", "A much longer prompt than the others", "xyz", "Tell me about Ada Lovelace.", "0123456789"]


def test_rows_joining_mid_decode_get_what_they_get_alone(lm):
    batcher = ContinuousBatcher(lm, max_batch=8, max_len=128)
    options = [dict(max_new_tokens=12 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    options[1] = dict(max_new_tokens=20, temperature=0.8, top_k=50, seed=11, ignore_eos=True)
    options[3] = dict(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3, repetition_penalty=1.3,
                      presence_penalty=0.5, frequency_penalty=0.4, ignore_eos=True)
    sinks = []
    batch_sizes = []
    with torch.inference_mode():
        for prompt, opts in zip(PROMPTS, options):
            seqs, s = request(lm, prompt, **opts)
            batcher.submit(seqs)
            sinks += s
            for _ in range(3):  # the next request arrives while these decode
                batcher.iteration()
                batch_sizes.append(len(batcher.engine.running))
    run_until_done(batcher, sinks)
    assert max(batch_sizes) >= 4  # they really ran together
    for prompt, opts, sink in zip(PROMPTS, options, sinks):
        alone = lm.generate(prompt, **opts)[0]
        assert sink.ids == alone.token_ids, prompt
        assert [e.logprob for e in sink.events] == pytest.approx(alone.logprobs, abs=1e-4)
        assert [e.score for e in sink.events] == pytest.approx(alone.scores, abs=1e-5)
        assert sink.text == alone.text
        assert sink.events[-1].finish_reason == "length" and all(e.finish_reason is None for e in sink.events[:-1])
    assert batcher.idle() and len(batcher.engine.free) == 8


def serve_all(lm, cases: list[tuple[str, dict]], max_len: int) -> list[Collector]:
    """Each (prompt, options) request submitted one iteration after the previous; every choice's sink."""
    batcher = ContinuousBatcher(lm, max_batch=8, max_len=max_len)
    sinks = []
    with torch.inference_mode():
        for prompt, opts in cases:
            seqs, s = request(lm, prompt, **opts)
            batcher.submit(seqs)
            sinks += s
            batcher.iteration()
    run_until_done(batcher, sinks)
    assert batcher.idle() and len(batcher.engine.free) == 8  # finished rows fed once more were released after it
    return sinks


@pytest.mark.parametrize("alignment", ["own", "predictive"])
def test_scores_equal_a_full_forward_however_a_row_ends(alignment):
    lm = probed_tiny_lm(alignment)
    first = lm.generate("Hello", max_new_tokens=24, ignore_eos=True)[0]
    lm.hf_config = {"eos_token_id": first.token_ids[5]}  # a second EOS, reached at token 6 (or earlier)
    fill = 48 - len(lm.encode(PROMPTS[4]))  # prompt + max_new_tokens = the slot: the last token takes its last cell
    cases = [("Hello", dict(max_new_tokens=24, ignore_eos=True)), ("Hello", dict(max_new_tokens=24)),
             ("Hello", dict(max_new_tokens=24, stop=[first.text[3:5]], ignore_eos=True)),
             (PROMPTS[1], dict(n=3, max_new_tokens=9, temperature=1.0, seed=2)),
             (PROMPTS[4], dict(max_new_tokens=fill, ignore_eos=True))]
    probe, lm.probe = lm.probe, None
    plain = serve_all(lm, cases, max_len=48)
    lm.probe = probe
    sinks = serve_all(lm, cases, max_len=48)
    prompts = [p for p, opts in cases for _ in range(opts.get("n", 1))]
    reasons = [s.events[-1].finish_reason for s in sinks]
    assert reasons[:3] == ["length", "stop", "stop"] and len(sinks[1].ids) <= 6 and reasons[-1] == "length"
    for prompt, sink, alone in zip(prompts, sinks, plain):
        assert (sink.ids, sink.text) == (alone.ids, alone.text)  # the probe changes nothing else
        assert [e.logprob for e in sink.events] == pytest.approx([e.logprob for e in alone.events], abs=1e-5)
        ids = lm.encode(prompt)
        full = lm.token_scores(ids + sink.ids)[len(ids):]
        assert [e.score for e in sink.events] == pytest.approx(full, abs=1e-5), (alignment, prompt)
    assert len(lm.encode(prompts[-1])) + len(sinks[-1].ids) == 48


def test_stop_strings_n_choices_and_top_logprobs(lm):
    full = lm.generate("Hello", max_new_tokens=24, ignore_eos=True)[0].text
    stop = full[6:8]
    batcher = ContinuousBatcher(lm, max_batch=4, max_len=128)
    seqs, sinks = request(lm, "Hello", max_new_tokens=24, stop=[stop], ignore_eos=True, top_logprobs=3)
    samples, sample_sinks = request(lm, "Hello", n=3, max_new_tokens=10, temperature=1.0, seed=5)
    batcher.submit(seqs)
    batcher.submit(samples)
    run_until_done(batcher, sinks + sample_sinks)
    assert sinks[0].text == full[: full.index(stop)] and sinks[0].events[-1].finish_reason == "stop"
    for e in sinks[0].events:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][0] == e.token_id  # greedy: the top token
        assert e.top_logprobs[0][1] == pytest.approx(e.logprob, abs=1e-6)
        assert e.top_logprobs[0][1] >= e.top_logprobs[1][1] >= e.top_logprobs[2][1]
    expected = lm.sample("Hello", n=3, max_new_tokens=10, temperature=1.0, seed=5)  # choice j: seed + j
    assert [s.ids for s in sample_sinks] == [c.token_ids for c in expected]


def test_cancelled_rows_free_their_slot_before_the_next_step(lm):
    batcher = ContinuousBatcher(lm, max_batch=2, max_len=128)
    reqs = [request(lm, p, max_new_tokens=50, ignore_eos=True) for p in PROMPTS[:3]]
    for seqs, _ in reqs:
        batcher.submit(seqs)
    with torch.inference_mode():
        batcher.iteration()
        assert len(batcher.engine.running) == 2 and batcher.stats()["waiting"] == 1
        reqs[0][0][0].cancel()
        batcher.iteration()  # the cancelled row leaves and the waiting request takes its slot in one step
    assert {r.seq for r in batcher.engine.running.values()} == {reqs[1][0][0], reqs[2][0][0]}
    n_events = len(reqs[0][1][0].events)
    run_until_done(batcher, reqs[1][1] + reqs[2][1])
    assert len(reqs[0][1][0].events) == n_events  # nothing more reached the cancelled client
    assert reqs[2][1][0].ids == lm.generate(PROMPTS[2], max_new_tokens=50, ignore_eos=True)[0].token_ids


def test_queue_is_bounded_and_draining_refuses(lm):
    batcher = ContinuousBatcher(lm, max_batch=1, max_queue=2, max_len=64)
    for _ in range(2):
        batcher.submit(request(lm, "Hello", max_new_tokens=4)[0])
    with pytest.raises(QueueFull, match="queue holds 2"):
        batcher.submit(request(lm, "Hello", max_new_tokens=4)[0])
    with pytest.raises(ValueError, match="exceed the context of 64 tokens"):
        batcher.submit(request(lm, "Hello", max_new_tokens=60)[0])
    batcher.stop_accepting()
    with pytest.raises(Draining):
        batcher.submit(request(lm, "Hello", max_new_tokens=4)[0])


def test_thread_serves_concurrent_submissions_and_abort_ends_streams(lm):
    batcher = ContinuousBatcher(lm, max_batch=4, max_len=256).start()
    try:
        events: dict[int, queue.Queue] = {i: queue.Queue() for i in range(6)}
        for i in range(6):
            config = GenerationConfig.from_kwargs(max_new_tokens=8, ignore_eos=True)
            batcher.submit([Sequence(lm.encode(PROMPTS[i % 5]), config, events[i].put)])
        for i in range(6):
            got = [events[i].get(timeout=HANG_GUARD) for _ in range(8)]
            assert [e.token_id for e in got] == lm.generate(PROMPTS[i % 5], max_new_tokens=8,
                                                            ignore_eos=True)[0].token_ids
        long = queue.Queue()
        config = GenerationConfig.from_kwargs(max_new_tokens=200, ignore_eos=True)
        batcher.submit([Sequence(lm.encode("Hello"), config, long.put)])
        long.get(timeout=HANG_GUARD)
        batcher.abort_all()
        while not (e := long.get(timeout=HANG_GUARD)).finish_reason:
            pass
        assert e.finish_reason == "abort" and batcher.stats()["running"] == 0
    finally:
        batcher.stop()
    assert not batcher.thread.is_alive()


def test_the_compiled_decode_step_serves_the_same_tokens(lm):
    """compile=True in the server: rows padded to a compiled width with idle slots (reset after each step), cells
    attended in static buckets — each request gets what the eager lm.generate gives it alone."""
    torch._dynamo.reset()
    cases = [("Hello", dict(max_new_tokens=14, ignore_eos=True)),
             (PROMPTS[1], dict(max_new_tokens=9, temperature=1.0, seed=4, ignore_eos=True)),
             (PROMPTS[3], dict(n=2, max_new_tokens=11, ignore_eos=True))]
    lm.compile_decode = True
    try:
        sinks = serve_all(lm, cases, max_len=128)
    finally:
        lm.compile_decode = False
    prompts = [(p, opts) for p, opts in cases for _ in range(opts.get("n", 1))]
    for (prompt, opts), sink in zip(prompts, sinks):
        alone = lm.generate(prompt, **{k: v for k, v in opts.items() if k != "n"})[0]
        assert sink.ids == alone.token_ids, prompt
        assert [e.logprob for e in sink.events] == pytest.approx(alone.logprobs, abs=1e-4)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_a_quantized_model_serves_the_librarys_tokens(compile_decode):
    """int8 weights (model/quantized_linear.py) in the server: the same engine, so the same tokens and scores as
    lm.generate of the same quantized model, eager and with compiled steps."""
    lm = probed_tiny_lm()
    quantize_model(lm.model, "int8")
    cases = [("Hello", dict(max_new_tokens=12, ignore_eos=True)),
             (PROMPTS[3], dict(max_new_tokens=9, temperature=1.0, seed=2, ignore_eos=True))]
    lm.compile_decode = compile_decode
    sinks = serve_all(lm, cases, max_len=128)
    for (prompt, opts), sink in zip(cases, sinks):
        alone = lm.generate(prompt, **opts)[0]
        assert sink.ids == alone.token_ids, prompt
        # lucidlm's kernels round activations to 16-bit integers per block: batching's float noise (~1e-7) can
        # move one rounding by a level (1/65534 of the block's largest), seen as ~1e-5 in a score
        assert [e.score for e in sink.events] == pytest.approx(alone.scores, abs=1e-4)
