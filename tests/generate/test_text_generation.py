"""lm.generate / lm.stream / lm.chat / best-of-N / self-consistency, and their bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_lm import tiny_lm

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_generate_returns_text_ids_and_logprobs(lm):
    out = lm.generate(["Hello", "A longer prompt"], max_new_tokens=12)
    assert len(out) == 2
    for c in out:
        assert len(c.token_ids) == len(c.logprobs) == 12 and c.finish_reason == "length"
        assert c.text == lm.decode(c.token_ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in c.logprobs)


def test_stream_pieces_add_up_to_generate(lm):
    for options in [dict(max_new_tokens=20), dict(max_new_tokens=20, temperature=0.9, top_k=20, seed=5)]:
        full = lm.generate("Hello", **options)[0]
        stop = full.text[4:7]
        for opts in [options, {**options, "stop": [stop]}]:
            expected = lm.generate("Hello", **opts)[0]
            tokens = list(lm.stream("Hello", **opts))
            assert [t.token_id for t in tokens] == expected.token_ids
            assert "".join(t.text for t in tokens) == expected.text
            assert [t.finish_reason for t in tokens[:-1]] == [None] * (len(tokens) - 1)
            assert tokens[-1].finish_reason == expected.finish_reason
        assert lm.generate("Hello", **options, stop=[stop])[0].text == full.text[: full.text.index(stop)]


def test_seed_reproducible_and_independent_of_batching(lm):
    opts = dict(max_new_tokens=16, temperature=1.0, seed=123)
    a = lm.generate(["Hello", "World"], **opts)
    b = lm.generate(["Hello", "World"], **opts)
    alone = lm.generate("World", **opts)[0]
    other_seed = lm.generate("World", **{**opts, "seed": 124})[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[1].token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_one_config_per_prompt_equals_each_prompt_alone(lm):
    from lucidlm.generate.generation_config import GenerationConfig

    gen = lm.generator()
    ids = [lm.encode("Hello"), lm.encode("World")]
    first = lm.generate("Hello", max_new_tokens=16, temperature=1.0, seed=3)[0]
    stop = first.text[5:7]
    configs = [GenerationConfig.from_kwargs(max_new_tokens=16, temperature=1.0, seed=3, stop=[stop]),
               GenerationConfig.from_kwargs(max_new_tokens=5, temperature=1.0, seed=9)]
    both = gen.generate(ids, configs, n=2)
    for i, config in enumerate(configs):
        alone = gen.generate(ids[i:i + 1], config, n=2)
        assert [c.token_ids for c in both[2 * i:2 * i + 2]] == [c.token_ids for c in alone]
    assert both[0].text == first.text[:first.text.index(stop)] and both[0].finish_reason == "stop"
    assert [len(c.token_ids) for c in both[2:]] == [5, 5]
    with pytest.raises(ValueError, match="same number"):
        gen.start_each(ids, [[(configs[0], 0)]])


def test_best_of_keeps_the_highest_mean_logprob(lm):
    samples = lm.sample("Hello", n=4, max_new_tokens=8, seed=7)
    assert len({tuple(s.token_ids) for s in samples}) > 1
    best = lm.generate("Hello", best_of=4, max_new_tokens=8, seed=7)[0]
    means = [s.mean_logprob for s in samples]
    assert best.token_ids == samples[means.index(max(means))].token_ids
    assert best.score == pytest.approx(max(means))
    custom = lm.generate("Hello", best_of=4, max_new_tokens=8, seed=7, scorer=lambda c: -c.mean_logprob)[0]
    assert custom.token_ids == samples[means.index(min(means))].token_ids


def test_self_consistency_votes_over_extracted_answers(lm):
    first_char = lambda text: text[:1] or None
    vote = lm.self_consistency("Hello", n=6, max_new_tokens=4, seed=1, extract=first_char)
    answers = [first_char(s.text) for s in lm.sample("Hello", n=6, max_new_tokens=4, seed=1)]
    assert vote.counts == {a: answers.count(a) for a in set(answers) if a is not None}
    assert vote.counts[vote.answer] == max(vote.counts.values())
    assert vote.agreement == pytest.approx(max(vote.counts.values()) / 6)


def test_chat_applies_the_template(lm):
    lm.tokenizer.chat_template = CHATML
    messages = [{"role": "user", "content": "hi"}]
    ids = lm.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    expected = lm.generate([ids], max_new_tokens=6)[0]
    assert lm.chat(messages, max_new_tokens=6).token_ids == expected.token_ids
    assert "".join(t.text for t in lm.chat(messages, stream=True, max_new_tokens=6)) == expected.text


def test_eos_from_generation_config(tmp_path):
    lm = tiny_lm()
    free = lm.generate("Hello", max_new_tokens=10)[0]
    lm.generation_defaults = {"eos_token_id": [free.token_ids[3]]}
    assert free.token_ids[3] in lm.eos_token_ids and lm.tokenizer.eos_token_id in lm.eos_token_ids
    cut = lm.generate("Hello", max_new_tokens=10)[0]
    assert cut.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]
    assert cut.finish_reason == "stop"
    assert lm.generate("Hello", max_new_tokens=10, ignore_eos=True)[0].token_ids == free.token_ids
    json.dumps(lm.generation_defaults)


BAD = [
    (dict(prompts=""), ValueError, "empty"),
    (dict(prompts=[]), ValueError, "prompts"),
    (dict(prompts=[[]]), ValueError, "empty"),
    (dict(prompts=[[1, 2, 99999]]), ValueError, "vocab_size"),
    (dict(prompts="x" * 300), ValueError, "context"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(min_p=2.0), ValueError, "min_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(top_q=0.9), TypeError, "top_q"),
    (dict(stop=[""]), ValueError, "stop"),
]


@pytest.mark.parametrize("kwargs,error,named", BAD, ids=[str(k) for k, _, _ in BAD])
def test_bad_input_fails_before_any_compute(lm, kwargs, error, named, monkeypatch):
    calls = []
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: calls.append(1))
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", "Hello")
    with pytest.raises(error, match=named):
        lm.generate(prompts, **kwargs)
    with pytest.raises(error, match=named):
        list(lm.stream(prompts if not isinstance(prompts, list) or not prompts else prompts[0], **kwargs))
    assert calls == []


def test_generation_runs_in_bfloat16():
    lm = tiny_lm()
    lm.model.to(torch.bfloat16)
    out = lm.generate("Hello", max_new_tokens=5)[0]
    assert len(out.token_ids) == 5 and all(lp <= 0 for lp in out.logprobs)
