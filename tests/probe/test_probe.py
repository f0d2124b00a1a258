"""The probe: the hook sees the model's own hidden state, streaming scores equal a full forward's, the
directory round-trips, it works on a transformers model, and mismatched probes are refused."""

from __future__ import annotations

import math

import pytest
import torch
from hf_parity import random_hf_model
from tiny_lm import tiny_lm

import lucidlm
from lucidlm.probe.probe import (
    LoadedProbe,
    ProbeConfig,
    ProbedModel,
    ProbeHead,
    load_probe,
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
def test_hook_captures_the_models_own_hidden_state_and_scores_align(alignment):
    lm = tiny_lm()
    head = random_head(lm.config.dim)
    probed = ProbedModel(lm.model, head, layer=1, alignment=alignment)
    with torch.no_grad():
        out = probed(IDS)
        own = lm.model(IDS, hidden_layers=[1])
    torch.testing.assert_close(out.hidden, own.hidden_states[1])
    torch.testing.assert_close(out.logits, own.logits)
    assert math.isnan(out.scores[0, 0])
    h = own.hidden_states[1][0]
    expected = torch.sigmoid(head(h[1:] if alignment == "own" else h[:-1]))  # token t from h[t] or h[t - 1]
    torch.testing.assert_close(out.scores[0, 1:], expected)


def test_probe_on_a_transformers_model():
    hf = random_hf_model("llama").eval()
    head = random_head(hf.config.hidden_size)
    with torch.no_grad():
        out = ProbedModel(hf, head, layer=0)(IDS)
        ref = hf(IDS, output_hidden_states=True)
    torch.testing.assert_close(out.hidden, ref.hidden_states[1])  # hidden_states[0] is the embedding
    torch.testing.assert_close(out.logits, ref.logits)


def test_streaming_and_generate_scores_equal_a_full_forward():
    lm = tiny_lm()
    lm.probe = LoadedProbe(random_head(lm.config.dim), ProbeConfig(layer=0, hidden_size=lm.config.dim, n_layers=2))
    prompt = "hello there"
    tokens = list(lm.stream(prompt, max_new_tokens=12, ignore_eos=True))
    assert all(t.score is not None and 0.0 <= t.score <= 1.0 for t in tokens)
    assert len({round(t.score, 6) for t in tokens}) > 1  # scores vary token to token
    ids = lm.encode(prompt)
    full = lm.token_scores(ids + [t.token_id for t in tokens])
    torch.testing.assert_close(torch.tensor([t.score for t in tokens]), torch.tensor(full[len(ids):]),
                               rtol=1e-5, atol=1e-6)
    batch = lm.generate([prompt, "a much longer prompt than that"], max_new_tokens=8, ignore_eos=True)
    assert batch[0].scores == pytest.approx([t.score for t in tokens[:8]], abs=1e-5)  # left padding changes nothing
    assert len(batch[1].scores) == 8


def test_save_and_load_round_trip(tmp_path):
    base = build_random_checkpoint(tmp_path / "model")
    lm = lucidlm.load(base, device="cpu")
    head = random_head(lm.config.dim, seed=3)
    save_probe(tmp_path / "probe", head, ProbeConfig(layer=2, hidden_size=lm.config.dim, n_layers=lm.config.n_layers))
    probed = lucidlm.load(base, probe=tmp_path / "probe", device="cpu")
    text = "The capital of France is"
    with torch.no_grad():
        out = lm.model(torch.tensor([lm.encode(text)]), hidden_layers=[2])
    expected = score_tokens(head, out.hidden_states[2], "predictive")[0, 1:]
    torch.testing.assert_close(torch.tensor(probed.token_scores(text)[1:]), expected)
    loaded, config = load_probe(tmp_path / "probe")
    assert config.alignment == "predictive"  # the default of probe directories written before alignments
    assert config.layer == 2 and torch.equal(loaded.linear.weight, head.linear.weight)


def test_mismatched_or_missing_probes_are_refused(tmp_path):
    base = build_random_checkpoint(tmp_path / "model")
    save_probe(tmp_path / "wide", random_head(512), ProbeConfig(layer=1, hidden_size=512, n_layers=4))
    with pytest.raises(ValueError, match="hidden size 512 and 4 layers; this model has 256 and 4"):
        lucidlm.load(base, probe=tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="not a probe directory"):
        lucidlm.load(base, probe=tmp_path)
    lm = tiny_lm()
    with pytest.raises(IndexError, match="probe layer 5 out of range for a model of 2 blocks"):
        ProbedModel(lm.model, random_head(lm.config.dim), layer=5)
    with pytest.raises(ValueError, match="no probe loaded"):
        lm.token_scores("hi")


def test_generate_cli_prints_scores_with_a_probe(tmp_path):
    import json

    from typer.testing import CliRunner

    from lucidlm.cli import app

    base = build_random_checkpoint(tmp_path / "model")
    save_probe(tmp_path / "probe", random_head(256), ProbeConfig(layer=1, hidden_size=256, n_layers=4))
    result = CliRunner().invoke(app, ["generate", "-m", str(base), "--probe", str(tmp_path / "probe"), "--json",
                                      "--max-new-tokens", "5", "Hello"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    expected = lucidlm.load(base, probe=tmp_path / "probe").generate("Hello", max_new_tokens=5)[0].scores
    assert record["scores"] == pytest.approx(expected, abs=1e-6) and len(record["scores"]) == 5


def test_an_unknown_alignment_is_refused():
    with pytest.raises(ValueError, match="alignment 'next' is not one of"):
        ProbeConfig(layer=0, hidden_size=8, n_layers=2, alignment="next")
