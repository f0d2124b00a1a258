"""The engine against transformers' generate and against recomputation without a cache."""

from __future__ import annotations

import pytest
import torch
from hf_parity import hf_checkpoint
from tiny_lm import tiny_model

from lucidlm.generate.engine import ProbeScoring
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.reference import greedy_no_cache

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [64, 2], [11, 12, 13, 14]]
NEW = 16


def capture_hidden(layer: int, alignment: str = "predictive") -> tuple[ProbeScoring, list[torch.Tensor]]:
    """A probe whose score is the first feature of the state it reads, keeping every state it was handed."""
    seen: list[torch.Tensor] = []

    def score(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden.clone())
        return hidden[:, 0]

    return ProbeScoring(score, layer, alignment), seen


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mixtral", "deepseek_v2", "mistral", "gpt2"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
    hf, loaded = hf_checkpoint(kind, tmp_path)
    engine = Generator(loaded.model)
    ours = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))  # one batch, left-padded
    for prompt, completion in zip(PROMPTS, ours):
        assert completion.token_ids == hf_greedy(hf, prompt, NEW)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("preset,overrides", [
    ("llama-125m", {}),
    ("mistral-7b", dict(sliding_window=4)),  # ring buffer wraps many times
    ("deepseek-v2-lite", {}),  # MLA latent cache, absorbed decode
    ("bloom-560m", {}),  # ALiBi biases from cached key positions
    ("gpt2", {}),  # learned absolute positions
])
def test_cached_decode_equals_recomputation(preset, overrides):
    model = tiny_model(preset, **overrides)
    engine = Generator(model, prefill_chunk=3)  # several prefill chunks per prompt
    got = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    for prompt, completion in zip(PROMPTS, got):
        assert completion.token_ids == greedy_no_cache(model, prompt, NEW)


def test_batch_equals_each_prompt_alone_and_finished_rows_leave():
    model = tiny_model()
    engine = Generator(model)
    alone = [engine.generate([p], GenerationConfig(max_new_tokens=NEW))[0] for p in PROMPTS]
    eos = alone[1].token_ids[3]  # row 1 stops early on this token; the others must be unaffected
    engine = Generator(model, eos_token_ids=[eos])
    batch = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    for a, b in zip(alone, batch):
        cut = a.token_ids.index(eos) + 1 if eos in a.token_ids else NEW
        assert b.token_ids == a.token_ids[:cut]
        assert b.finish_reason == ("stop" if eos in a.token_ids else "length")
        torch.testing.assert_close(b.logprobs, a.logprobs[:cut], atol=1e-4, rtol=0)
    probe, seen = capture_hidden(layer=0)
    Generator(model, eos_token_ids=[eos], probe=probe).generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    sizes = [h.shape[0] for h in seen]  # rows of every forward: the prefill, then each decode step
    assert sizes[0] == 3 and sizes[-1] < 3  # the finished row stopped being computed


def test_logprobs_are_the_models_log_softmax():
    model = tiny_model()
    prompt = PROMPTS[0]
    got = Generator(model).generate([prompt], GenerationConfig(max_new_tokens=5))[0]
    ids = torch.tensor([prompt + got.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(got.token_ids)]
    torch.testing.assert_close(got.logprobs, expected, atol=1e-4, rtol=0)


def test_stop_token_ids_and_context_end():
    model = tiny_model(max_seq_len=12)
    engine = Generator(model)
    out = engine.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=50))[0]
    assert len(PROMPTS[0]) + len(out.token_ids) == 12 + 1  # the last token is sampled, never fed back
    assert out.finish_reason == "length"
    stop = out.token_ids[2]
    out2 = engine.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=50, stop_token_ids=[stop]))[0]
    assert out2.token_ids == out.token_ids[: out.token_ids.index(stop) + 1] and out2.finish_reason == "stop"


@pytest.mark.parametrize("alignment", ["predictive", "own"])
def test_hidden_states_the_probe_reads_match_a_full_forward(alignment):
    """Each forward hands the probe the state of the last position it was fed: "predictive", the state that
    decoded each token (the prefill's last, then each fed token's); "own", each token's own state (decode forwards
    only: the last token is fed once more, so it has one too)."""
    model = tiny_model()
    prompt = PROMPTS[0]
    probe, seen = capture_hidden(layer=1, alignment=alignment)
    got = Generator(model, probe=probe).generate([prompt], GenerationConfig(max_new_tokens=6))[0]
    with torch.no_grad():
        full = model.forward_outputs(torch.tensor([prompt + got.token_ids]), hidden_layers=[1]).hidden_states[1][0]
    fed = torch.cat(seen)  # (forwards, dim)
    start = len(prompt) - 1 if alignment == "predictive" else len(prompt)
    assert fed.shape == (len(got.token_ids), model.config.dim)
    torch.testing.assert_close(fed, full[start: start + len(got.token_ids)], atol=1e-4, rtol=0)
    assert got.scores == pytest.approx(fed[:, 0].tolist(), abs=1e-6)


def test_a_progress_bar_counts_each_finished_completion(monkeypatch):
    from contextlib import contextmanager

    from lucidlm.generate import offline

    calls: list[tuple] = []

    @contextmanager
    def recording_bar(total, description, enabled=None):
        calls.append(("open", total, description, enabled))
        yield lambda amount: calls.append(("advance", amount))

    monkeypatch.setattr(offline, "progress_bar", recording_bar)
    out = Generator(tiny_model()).generate(PROMPTS, GenerationConfig(max_new_tokens=4), n=2, progress="answers")
    assert calls[0] == ("open", 6, "answers", None) and calls[1:] == [("advance", 1)] * 6
    assert len(out) == 6
    calls.clear()
    Generator(tiny_model()).generate(PROMPTS, GenerationConfig(max_new_tokens=4))
    assert calls[0] == ("open", 3, "", False)  # no description: the bar is off
