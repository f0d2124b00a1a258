"""Probe-guided decoding (generate/probe_guided.py) against plain ``lm.generate``: every pass and attempt is
reproduced independently, as ``lm.generate`` of prompt + accepted tokens with the attempt's seed, cut at its first
sentence end by a naive search of the text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_lm import random_probe, tiny_lm

from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.probe_guided import GuidedConfig, guided_generate

NEW = 24
SAMPLED = dict(max_new_tokens=NEW, temperature=0.9, seed=3)


@pytest.fixture(scope="module")
def lm():
    lm = tiny_lm()
    lm.probe = random_probe(lm, layer=1)
    return lm


@pytest.fixture(scope="module")
def prompts(lm):
    return [lm.encode("Hello world"), lm.encode("Another prompt")]


def run(lm, prompts, guided: GuidedConfig, **options):
    return guided_generate(lm.generator(), prompts, GenerationConfig.from_kwargs(**options), guided)


def first_sentence(completion, boundaries):
    """Token ids and scores of a completion up to the token holding its first complete boundary's first char."""
    pieces = completion.pieces
    text, owner = "", []
    for i, piece in enumerate(pieces):
        text += piece
        owner += [i] * len(piece)
        found = [text.find(b) for b in boundaries if b in text]
        if found:
            end = owner[min(found)] + 1
            return completion.token_ids[:end], completion.scores[:end], None
    return completion.token_ids, completion.scores, completion.finish_reason


def with_pieces(lm, prompt, **options):
    """What ``lm.generate`` gives, with each token's text: ``lm.stream``'s events (tests/generate/
    test_text_generation.py checks that they add up to ``lm.generate``'s completion)."""
    events = list(lm.stream(prompt, **options))
    return SimpleNamespace(token_ids=[e.token_id for e in events], scores=[e.score for e in events],
                           pieces=[e.text for e in events], text="".join(e.text for e in events),
                           finish_reason=events[-1].finish_reason)


def top(scores):
    return max(s for s in scores if s is not None)


@pytest.mark.parametrize("mode", ["abstain", "resample"])
@pytest.mark.parametrize("options", [dict(max_new_tokens=NEW), SAMPLED])
def test_a_threshold_never_passed_is_plain_decoding(lm, prompts, mode, options):
    plain = lm.generate(prompts, **options)
    assert max(top(c.scores) for c in plain) < 1.0  # so threshold 1 is never passed
    guided = GuidedConfig(threshold=1.0, mode=mode, temperature=0.9)
    for got, want in zip(run(lm, prompts, guided, **options), plain):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason and got.events == []
        torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)


def test_abstain_at_threshold_zero_abstains_at_the_first_token(lm, prompts):
    plain = lm.generate(prompts, **SAMPLED)
    for got, want in zip(run(lm, prompts, GuidedConfig(threshold=0.0, abstention="Not sure."), **SAMPLED), plain):
        assert got.text == "Not sure." and got.token_ids == [] and got.abstained
        assert [(e.kind, e.token) for e in got.events] == [("flagged", 0), ("abstained", 0)]
        torch.testing.assert_close(got.events[0].score, want.scores[0], atol=1e-5, rtol=0)


def test_abstain_answers_exactly_when_the_plain_answer_stays_under_the_threshold(lm, prompts):
    plain = lm.generate(prompts, **SAMPLED)
    for threshold in sorted(top(c.scores) for c in plain):
        for got, want in zip(run(lm, prompts, GuidedConfig(threshold=threshold), **SAMPLED), plain):
            assert got.abstained == (top(want.scores) > threshold)
            if not got.abstained:
                assert got.token_ids == want.token_ids


def test_abstain_rest_keeps_the_sentences_finished_before_the_flag(lm, prompts):
    want = with_pieces(lm, prompts[0], **SAMPLED)
    boundary = want.text[3]  # a sentence ends early
    first, first_scores, _ = first_sentence(want, [boundary])
    threshold = top(first_scores)
    later = [i for i, s in enumerate(want.scores) if s > threshold]
    assert later and later[0] >= len(first)  # the flag falls after the first sentence
    guided = GuidedConfig(threshold=threshold, abstain_scope="rest", boundaries=(boundary,), abstention="?")
    got = run(lm, prompts[:1], guided, **SAMPLED)[0]
    assert got.abstained and got.events[0].token == later[0]
    kept = got.token_ids
    assert kept == want.token_ids[:len(kept)] and len(first) <= len(kept) <= later[0]
    said = "".join(want.pieces[:len(kept)])
    assert got.text == said + ("" if said[-1].isspace() else " ") + "?"


def test_resample_keeps_the_lowest_max_attempt_of_k(lm, prompts):
    k, seed, prompt = 3, 11, prompts[0]
    # boundaries from the first attempts' texts, so that sentences end within the budget
    boundaries = tuple({with_pieces(lm, prompt, **SAMPLED | dict(seed=seed + i)).text[2] for i in range(k)})
    guided = GuidedConfig(threshold=0.0, mode="resample", k=k, max_sentences=2, on_all_flagged="keep_best",
                          boundaries=boundaries, seed=seed)
    got = run(lm, [prompt], guided, **SAMPLED)[0]

    # the reference: round r's attempt i is lm.generate(prompt + accepted, seed + r(k+1) + i) to its first end
    accepted: list[int] = []
    resampled = [e for e in got.events if e.kind == "resampled"]
    assert len(resampled) == 2
    for r, event in enumerate(resampled):
        assert event.token == len(accepted)
        tries = [first_sentence(with_pieces(lm, prompt + accepted, **SAMPLED | dict(
            max_new_tokens=NEW - len(accepted), seed=seed + r * (k + 1) + i)), boundaries) for i in range(k)]
        assert [a.seed for a in event.attempts] == [seed + r * (k + 1) + i for i in range(k)]
        for attempt, (ids, scores, _) in zip(event.attempts, tries):
            assert [t.id for t in attempt.tokens] == ids
            torch.testing.assert_close([t.score for t in attempt.tokens], scores, atol=1e-5, rtol=0)
        maxima = [top(scores) for _, scores, _ in tries]
        assert event.kept == maxima.index(min(maxima)) and event.score == pytest.approx(min(maxima), abs=1e-5)
        accepted += tries[event.kept][0]
    # past max_sentences the flagged rest is kept as written: plain decoding with the continuation seed
    rest = lm.generate([prompt + accepted], **SAMPLED | dict(max_new_tokens=NEW - len(accepted),
                                                              seed=seed + 2 * (k + 1) - 1))[0]
    assert got.token_ids == accepted + rest.token_ids and got.finish_reason == rest.finish_reason
    assert got.text == "".join(got.sentences) == lm.decode(got.token_ids, skip_special_tokens=True)
    assert len(got.sentences) >= 2


def test_resample_abstains_when_every_attempt_is_flagged(lm, prompts):
    guided = GuidedConfig(threshold=0.0, mode="resample", k=2, temperature=1.0)
    for got in run(lm, prompts, guided, max_new_tokens=NEW):  # greedy decoding, sampled attempts
        assert got.abstained and got.text == "I don't know." and got.token_ids == []
        assert [e.kind for e in got.events] == ["flagged", "resampled", "abstained"]
        assert len(got.events[1].attempts) == 2


class Spy(Generator):
    engines: list = []

    def call_engine(self, rows, tokens, **options):
        self.engines.append(super().call_engine(rows, tokens, **options))
        return self.engines[-1]


def test_resample_requests_reuse_the_prompt_head(lm):
    """A prompt longer than a prefix-cache block: the attempts' and the continuation's requests copy its cached
    head instead of prefilling it again, and still give what lm.generate gives."""
    gen, prompt = lm.generator(), lm.encode("x" * 100)
    spy = Spy(gen.model, gen.tokenizer, gen.eos_token_ids, gen.probe)
    boundary = with_pieces(lm, prompt, **SAMPLED).text[2]
    guided = GuidedConfig(threshold=0.0, mode="resample", max_sentences=1, on_all_flagged="keep_best",
                          boundaries=(boundary,))
    got = guided_generate(spy, [prompt], GenerationConfig.from_kwargs(**SAMPLED), guided)[0]
    assert spy.engines[-1].stats()["prefix_hits"] >= 2
    event = got.events[1]
    for attempt in event.attempts:
        want = first_sentence(with_pieces(lm, prompt, **SAMPLED | dict(seed=attempt.seed)), (boundary,))
        assert [t.id for t in attempt.tokens] == want[0]
    assert got.token_ids[:len(event.attempts[event.kept].tokens)] == [t.id for t in event.attempts[event.kept].tokens]


class NoWork(Generator):
    def call_engine(self, rows, tokens, **options):
        raise AssertionError("work started before the request was checked")


@pytest.mark.parametrize("fields, message", [
    (dict(threshold=1.5), "threshold"), (dict(threshold="0.5"), "threshold"), (dict(mode="stop"), "mode"),
    (dict(k=0), "k must"), (dict(max_sentences=-1), "max_sentences"), (dict(boundaries=("",)), "boundaries"),
    (dict(abstain_scope="all"), "abstain_scope"), (dict(on_all_flagged="x"), "on_all_flagged"),
    (dict(temperature=-1.0), "temperature"), (dict(abstention=None), "abstention"), (dict(seed=-1), "seed")])
def test_bad_config_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        GuidedConfig(**fields)


def test_bad_requests_are_named_before_work(lm, prompts):
    gen = lm.generator()
    no_work = NoWork(gen.model, gen.tokenizer, gen.eos_token_ids, gen.probe)
    cases = [(NoWork(gen.model, gen.tokenizer, gen.eos_token_ids), GuidedConfig(), {}, "needs a probe"),
             (no_work, GuidedConfig(mode="resample"), {}, "needs sampling"),
             (no_work, GuidedConfig(), dict(num_beams=2), "beam search")]
    for generator, guided, options, message in cases:
        with pytest.raises(ValueError, match=message):
            guided_generate(generator, prompts, GenerationConfig.from_kwargs(max_new_tokens=4, **options), guided)
    with pytest.raises(ValueError, match="outside"):
        guided_generate(no_work, [[10**6]], GenerationConfig(), GuidedConfig())


def test_lm_guided_is_guided_generate_on_the_lms_generator(lm, prompts):
    """``lm.guided`` encodes text prompts and runs the same decoding as ``guided_generate``."""
    guided = GuidedConfig(threshold=0.0, mode="abstain")
    via_lm = lm.guided(["Hello world", "Another prompt"], guided, max_new_tokens=6)
    direct = run(lm, prompts, guided, max_new_tokens=6)
    assert [(r.text, r.finish_reason, r.token_ids) for r in via_lm] == [(r.text, r.finish_reason, r.token_ids)
                                                                       for r in direct]
    assert all(r.abstained for r in via_lm)
