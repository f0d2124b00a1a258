"""The probe: one forward's scores align with its tokens, streaming scores equal a full forward's, the
directory round-trips, its checks work on a transformers model, and mismatched probes are refused."""

from __future__ import annotations

import math

import pytest
import torch
from hf_parity import random_hf_model
from tiny_lm import random_probe, tiny_lm

import lucidlm
from lucidlm.generate.events import Completion
from lucidlm.probe.probe import (
    ProbeConfig,
    ProbeHead,
    decoder_blocks,
    hidden_size_of,
    load_probe,
    model_identity,
    save_probe,
    score_tokens,
)
from lucidlm.random_checkpoint import build_random_checkpoint

IDS = torch.tensor([[5, 9, 2, 7, 1, 4, 8, 3]])


def random_head(hidden: int, seed: int = 0) -> ProbeHead:
    torch.manual_seed(seed)
    head = ProbeHead(hidden)
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.05)
    return head.eval()


@pytest.mark.parametrize("alignment", ["own", "predictive"])
def test_scores_of_one_forward_align(alignment):
    lm = tiny_lm()
    head = random_head(lm.config.dim)
    with torch.no_grad():
        out = lm.model.forward_outputs(IDS, hidden_layers=[1])  # one pass: logits and block 1's output
        scores = score_tokens(head, out.hidden_states[1], alignment)
    assert math.isnan(scores[0, 0])
    h = out.hidden_states[1][0]
    expected = torch.sigmoid(head(h[1:] if alignment == "own" else h[:-1]))  # token t from h[t] or h[t - 1]
    torch.testing.assert_close(scores[0, 1:], expected)


def test_probe_checks_on_a_transformers_model():
    hf = random_hf_model("llama").eval()
    assert len(decoder_blocks(hf)) == hf.config.num_hidden_layers
    assert hidden_size_of(hf) == hf.config.hidden_size
    identity = model_identity(hf)  # no lucidlm config to hash; the embedding fingerprint still tells models apart
    assert identity["config_sha256"] is None and identity != model_identity(random_hf_model("llama", seed=1))


PROMPTS = ["hello there", "a much longer prompt than that"]


def probed_lm(alignment: str, **overrides):
    lm = tiny_lm(**overrides)
    lm.probe = random_probe(lm, layer=0, alignment=alignment)
    return lm


def every_way_to_generate(lm, stop: str) -> list[tuple[list[int], Completion]]:
    """(prompt ids, completion) of lm.stream, a left-padded lm.generate batch and n samples (lm.sample), each
    ended by max_new_tokens, by the stop string and by EOS (lm.eos_token_ids)."""
    out = []
    for options in (dict(ignore_eos=True), dict(stop=[stop], ignore_eos=True), {}):
        tokens = list(lm.stream(PROMPTS[0], max_new_tokens=12, **options))
        out.append((lm.encode(PROMPTS[0]), Completion(
            [t.token_id for t in tokens], [t.logprob for t in tokens], tokens[-1].finish_reason,
            "".join(t.text for t in tokens), scores=None if lm.probe is None else [t.score for t in tokens])))
        assert all(t.finish_reason is None for t in tokens[:-1])
        out += zip([lm.encode(p) for p in PROMPTS], lm.generate(PROMPTS, max_new_tokens=12, **options))
        samples = lm.sample(PROMPTS[1], n=3, max_new_tokens=10, temperature=1.0, seed=3, **options)
        out += [(lm.encode(PROMPTS[1]), c) for c in samples]
    return out


@pytest.mark.parametrize("alignment", ["own", "predictive"])
def test_streaming_and_generate_scores_equal_a_full_forward(alignment):
    lm = probed_lm(alignment)
    probe, lm.probe = lm.probe, None
    free = lm.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)[0]
    stop = free.text[6:8]
    lm.hf_config = {"eos_token_id": free.token_ids[4]}  # a second EOS that the first prompt reaches at token 5
    plain = every_way_to_generate(lm, stop)
    lm.probe = probe
    scored = every_way_to_generate(lm, stop)

    assert [c.finish_reason for _, c in scored[:3]] == ["length", "length", "length"]
    assert [c.finish_reason for _, c in scored[6:9]] == ["stop", "stop", "length"]  # the stop string
    assert scored[12][1].finish_reason == "stop" and len(scored[12][1].token_ids) == 5  # EOS
    for (ids, c), (_, p) in zip(scored, plain):
        assert (c.token_ids, c.text, c.finish_reason) == (p.token_ids, p.text, p.finish_reason)  # the probe
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-5)  # changes nothing else
        full = lm.token_scores(ids + c.token_ids)[len(ids):]  # one forward over the whole text
        assert None not in c.scores and c.scores == pytest.approx(full, abs=1e-5), (alignment, c.finish_reason)
    streamed = scored[0][1].scores
    assert len({round(s, 6) for s in streamed}) > 1  # scores vary token to token
    assert scored[1][1].scores == pytest.approx(streamed, abs=1e-5)  # left padding changes nothing


def test_own_alignment_cannot_score_a_token_that_fills_the_context():
    lm = probed_lm("own", max_seq_len=24)
    ids = lm.encode("x" * 19)
    tokens = list(lm.stream(ids, max_new_tokens=10, ignore_eos=True))
    generated = [t.token_id for t in tokens]
    assert len(ids) + len(generated) == 25 and tokens[-1].finish_reason == "length"  # 24 cells, the last never fed
    full = lm.token_scores(ids + generated[:-1])[len(ids):]
    assert tokens[-1].score is None and [t.score for t in tokens[:-1]] == pytest.approx(full, abs=1e-5)
    completion = lm.generate([ids], max_new_tokens=10, ignore_eos=True)[0]
    assert completion.token_ids == generated and completion.scores[-1] is None
    assert completion.scores[:-1] == pytest.approx(full, abs=1e-5)


def test_save_and_load_round_trip(tmp_path):
    base = build_random_checkpoint(tmp_path / "model")
    lm = lucidlm.load(base, device="cpu")
    head = random_head(lm.config.dim, seed=3)
    save_probe(tmp_path / "probe", head, ProbeConfig(layer=2, hidden_size=lm.config.dim, n_layers=lm.config.n_layers),
               lm.model)  # with the model: its identity is recorded, and checked at load
    probed = lucidlm.load(base, probe=tmp_path / "probe", device="cpu")
    text = "The capital of France is"
    with torch.no_grad():
        out = lm.model.forward_outputs(torch.tensor([lm.encode(text)]), hidden_layers=[2])
    expected = score_tokens(head, out.hidden_states[2], "predictive")[0, 1:]
    torch.testing.assert_close(torch.tensor(probed.token_scores(text)[1:]), expected)
    loaded, config = load_probe(tmp_path / "probe")
    assert config.alignment == "predictive"  # the default of probe directories written before alignments
    assert config.layer == 2 and torch.equal(loaded.linear.weight, head.linear.weight)
    assert config.model_identity == model_identity(lm.model) and not config.has_adapter


def test_mismatched_or_missing_probes_are_refused(tmp_path):
    base = build_random_checkpoint(tmp_path / "model")
    save_probe(tmp_path / "wide", random_head(512), ProbeConfig(layer=1, hidden_size=512, n_layers=4))
    with pytest.raises(ValueError, match="hidden size 512 and 4 layers; this model has 256 and 4"):
        lucidlm.load(base, probe=tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="not a probe directory"):
        lucidlm.load(base, probe=tmp_path)
    lm = tiny_lm()
    with pytest.raises(ValueError, match="probe layer 5 out of range for a model of 2 blocks"):
        ProbeConfig(layer=5, hidden_size=lm.config.dim, n_layers=len(lm.model.blocks))
    with pytest.raises(ValueError, match="no probe loaded"):
        lm.token_scores("hi")


def test_generate_cli_prints_scores_with_a_probe(tmp_path):
    import json

    from typer.testing import CliRunner

    from lucidlm.apps.cli import app

    base = build_random_checkpoint(tmp_path / "model")
    save_probe(tmp_path / "probe", random_head(256), ProbeConfig(layer=1, hidden_size=256, n_layers=4, alignment="own"))
    result = CliRunner().invoke(app, ["generate", "-m", str(base), "--probe", str(tmp_path / "probe"), "--json",
                                      "--max-new-tokens", "5", "Hello"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    expected = lucidlm.load(base, probe=tmp_path / "probe").generate("Hello", max_new_tokens=5)[0].scores
    assert record["scores"] == pytest.approx(expected, abs=1e-6) and len(record["scores"]) == 5


def test_an_unknown_alignment_is_refused():
    with pytest.raises(ValueError, match="alignment 'next' is not one of"):
        ProbeConfig(layer=0, hidden_size=8, n_layers=2, alignment="next")
