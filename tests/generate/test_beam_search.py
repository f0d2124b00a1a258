"""Beam search against transformers' ``generate(num_beams=...)``: same sequences, same scores.

Our prompts run as one left-padded batch; each is compared with transformers run on that prompt alone.
The EOS ids are tokens of transformers' unconstrained beams (one per prompt), so that some beams end
early; with them the three early_stopping modes give three different answers (checked below, so the
parity tests cannot pass vacuously).
"""

from __future__ import annotations

import pytest
import torch
from hf_parity import hf_checkpoint

from lucidlm.generate.beam_search import beam_search
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.sampling import SamplingParams

EOS = {"llama": (26, 69), "qwen3": (39, 44)}  # model kind -> EOS ids
PROMPTS = [[20, 115, 80, 115], [103, 9, 83, 21, 64, 7, 5]]
BEAMS = 4
NEW = 12
ATOL = 1e-4


@pytest.fixture(scope="module", params=list(EOS))
def models(request, tmp_path_factory):
    """(kind, transformers model, lucidlm model) with the same random weights."""
    hf, loaded = hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    hf.generation_config.eos_token_id = None  # EOS only where a test passes one
    return request.param, hf, loaded.model


@torch.no_grad()
def hf_beams(hf, prompt: list[int], eos=(), new: int = NEW, **kwargs) -> list[tuple[list[int], float]]:
    """transformers' returned hypotheses of one prompt: (generated ids, sequences_scores), best first."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=kwargs.pop("num_beams", BEAMS),
                      do_sample=False, max_new_tokens=new, eos_token_id=list(eos) or None, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True, **kwargs)
    lengths = (out.beam_indices >= 0).sum(1)  # generated tokens of each hypothesis (the rest is filler)
    return [(seq[len(prompt):len(prompt) + n].tolist(), float(score))
            for seq, n, score in zip(out.sequences, lengths.tolist(), out.sequences_scores)]


def config(**kwargs) -> GenerationConfig:
    return GenerationConfig(**{"num_beams": BEAMS, "max_new_tokens": NEW, **kwargs})


def assert_same(ours, theirs) -> None:
    assert [c.token_ids for c in ours] == [ids for ids, _ in theirs]
    torch.testing.assert_close(torch.tensor([c.score for c in ours]), torch.tensor([s for _, s in theirs]),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_return_sequences", [1, 4])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_matches_transformers(models, length_penalty, early_stopping, num_return_sequences):
    kind, hf, model = models
    eos = EOS[kind]
    cfg = config(length_penalty=length_penalty, early_stopping=early_stopping)
    ours = beam_search(model, PROMPTS, cfg, eos, num_return_sequences=num_return_sequences)
    assert len(ours) == len(PROMPTS)
    for prompt, completions in zip(PROMPTS, ours):
        theirs = hf_beams(hf, prompt, eos, length_penalty=length_penalty, early_stopping=early_stopping,
                          num_return_sequences=num_return_sequences)
        assert_same(completions, theirs)
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason == ("stop" if c.token_ids[-1] in eos else "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == NEW


def test_setup_exercises_every_rule(models):
    """The cases above tell the rules apart: each early_stopping mode and length penalty changes
    transformers' answer, and beams end both on EOS and on the budget."""
    kind, hf, _ = models
    eos = EOS[kind]
    early = []
    for prompt in PROMPTS:
        modes = [hf_beams(hf, prompt, eos, early_stopping=m, num_return_sequences=4) for m in (True, False, "never")]
        assert modes[0] != modes[1] != modes[2] != modes[0]
        early += [len(ids) < NEW for hypotheses in modes for ids, _ in hypotheses]
        penalties = [[ids for ids, _ in hf_beams(hf, prompt, eos, length_penalty=lp)] for lp in (0.0, 1.0, 2.0)]
        assert penalties[0] != penalties[2]
    assert any(early) and not all(early)


@torch.no_grad()
def assert_model_logprobs(hf, prompt: list[int], completion) -> None:
    """The completion's logprobs are transformers' log_softmax of its logits at the chosen tokens."""
    logits = hf(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=ATOL, rtol=0)


def test_logprobs_and_score_are_the_models(models):
    kind, hf, model = models
    length_penalty = 2.0
    ours = beam_search(model, PROMPTS, config(length_penalty=length_penalty), EOS[kind], num_return_sequences=4)
    for prompt, completions in zip(PROMPTS, ours):
        for c in completions:
            assert_model_logprobs(hf, prompt, c)
            assert abs(sum(c.logprobs) / len(c.logprobs) ** length_penalty - c.score) < ATOL


@torch.no_grad()
def test_many_eos_tokens_keep_enough_candidates(models):
    """With the 6 likeliest first tokens as EOS, most of the top 2·num_beams first candidates end; transformers
    keeps (1 + #EOS)·num_beams candidates so that num_beams beams still go on ("never" lets them matter)."""
    _, hf, model = models
    for prompt in PROMPTS:
        eos = hf(torch.tensor([prompt])).logits[0, -1].topk(6).indices.tolist()
        ours = beam_search(model, [prompt], config(early_stopping="never"), eos, num_return_sequences=4)[0]
        assert_same(ours, hf_beams(hf, prompt, eos, early_stopping="never", num_return_sequences=4))


def test_without_eos_runs_to_the_budget(models):
    _, hf, model = models
    ours = beam_search(model, PROMPTS, config(), num_return_sequences=4)
    for prompt, completions in zip(PROMPTS, ours):
        assert_same(completions, hf_beams(hf, prompt, num_return_sequences=4))
        assert all(c.finish_reason == "length" and len(c.token_ids) == NEW for c in completions)


def test_repetition_penalty(models):
    """transformers applies the penalty to the log-probabilities in beam search; so do we."""
    kind, hf, model = models
    cfg = config(sampling=SamplingParams(temperature=0.0, repetition_penalty=1.1))
    ours = beam_search(model, PROMPTS, cfg, EOS[kind], num_return_sequences=4)
    for prompt, completions in zip(PROMPTS, ours):
        theirs = hf_beams(hf, prompt, EOS[kind], repetition_penalty=1.1, num_return_sequences=4)
        assert theirs != hf_beams(hf, prompt, EOS[kind], num_return_sequences=4)  # the penalty matters here
        assert_same(completions, theirs)
        for c in completions:  # the model's log-probs, not the penalised ones that rank the beams
            assert_model_logprobs(hf, prompt, c)


def test_batch_order_and_prefill_chunks_do_not_matter(models):
    kind, _, model = models
    cfg = config(early_stopping="never")
    base = beam_search(model, PROMPTS, cfg, EOS[kind], num_return_sequences=4)
    chunked = beam_search(model, PROMPTS, cfg, EOS[kind], prefill_chunk=2, num_return_sequences=4)
    reversed_ = beam_search(model, PROMPTS[::-1], cfg, EOS[kind], num_return_sequences=4)[::-1]
    alone = [beam_search(model, [p], cfg, EOS[kind], num_return_sequences=4)[0] for p in PROMPTS]
    for other in (chunked, reversed_, alone):
        for a, b in zip(base, other):
            assert [c.token_ids for c in a] == [c.token_ids for c in b]
            assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=ATOL)


def test_stop_token_ids_end_beams_and_ignore_eos_does_not(models):
    kind, _, model = models
    eos = EOS[kind]
    with_eos = beam_search(model, PROMPTS, config(), eos, num_return_sequences=4)
    with_stop = beam_search(model, PROMPTS, config(stop_token_ids=eos), num_return_sequences=4)
    assert with_eos == with_stop
    ignored = beam_search(model, PROMPTS, config(ignore_eos=True), eos, num_return_sequences=4)
    assert ignored == beam_search(model, PROMPTS, config(), num_return_sequences=4)
    assert ignored != with_eos


def test_context_limit_ends_beams(models):
    """A prompt 5 tokens short of the context gets 6 new tokens (the last one is never fed back)."""
    _, hf, model = models
    prompt = torch.randint(0, 128, (model.config.max_seq_len - 5,), generator=torch.Generator().manual_seed(3))
    prompt = prompt.tolist()
    ours = beam_search(model, [prompt], config(max_new_tokens=20), num_return_sequences=4)[0]
    assert_same(ours, hf_beams(hf, prompt, new=6, num_return_sequences=4))
    assert all(c.finish_reason == "length" for c in ours)


def test_one_beam_without_eos_is_greedy(models):
    _, _, model = models
    ours = beam_search(model, PROMPTS, config(num_beams=1))
    greedy = Generator(model).generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    assert [r[0].token_ids for r in ours] == [c.token_ids for c in greedy]


def test_bad_options_fail_before_compute(models, monkeypatch):
    _, _, model = models

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the options were checked")

    monkeypatch.setattr(model, "forward", no_forward)
    for n in (0, BEAMS + 1):
        with pytest.raises(ValueError, match="num_return_sequences"):
            beam_search(model, PROMPTS, config(), num_return_sequences=n)
    cfg = config()
    object.__setattr__(cfg, "num_beams", 0)  # GenerationConfig itself refuses this; beam_search checks again
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, PROMPTS, cfg)
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        beam_search(model, PROMPTS, config(), pad_token_id=-1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        beam_search(model, [[1], []], config())
