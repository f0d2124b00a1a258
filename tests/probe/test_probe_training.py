"""A trained probe beats the random-init head on labels its layer can see; the layer sweep and LoRA probes train."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.model.lora import LoRAConfig, lora_layers
from lucidlm.probe.data import IGNORE, LabeledExample
from lucidlm.probe.evaluate import evaluate_probe
from lucidlm.probe.train import ProbeTrainConfig, sweep, train_probe

TRIGGERS = set(range(10, 20))  # a token at (own) or right after (predictive) one of these is "hallucinated"


def examples(n: int, seed: int, alignment: str = "predictive") -> list[LabeledExample]:
    """Random sequences; prompt = first 4 tokens; a response token is positive when the token the alignment
    reads (itself for "own", the one before it for "predictive") is a trigger; spans = runs of 3 response
    tokens, positive if any token in them is."""
    rng = random.Random(seed)
    shift = 0 if alignment == "own" else 1
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 60) for _ in range(24)]
        labels = [IGNORE] * 4 + [int(ids[t - shift] in TRIGGERS) for t in range(4, 24)]
        span_ids = [-1] * 4 + [(t - 4) // 3 if t < 22 else -1 for t in range(4, 24)]
        span_labels = [max(labels[t] for t in range(24) if span_ids[t] == s) for s in range(6)]
        out.append(LabeledExample(ids, labels, span_ids, span_labels))
    return out


@pytest.mark.parametrize("alignment", ["own", "predictive"])
def test_trained_probe_beats_the_random_head_and_the_baselines(alignment):
    model = tiny_model(vocab_size=64, sharpen=1.0)  # unsharpened: the residual stream still carries the token
    config = ProbeTrainConfig(layer=1, alignment=alignment, steps=150, lr=1e-2, progress=False)
    head = train_probe(model, examples(64, 0, alignment), config, 0)
    report = evaluate_probe(model, head, 1, examples(32, 1, alignment), pad_id=0, alignment=alignment)
    probe, random_head = report["probe"], report["baselines"]["random_head"]
    assert probe["token"]["auroc"] > 0.9 and probe["span_max"]["auroc"] > 0.9
    assert probe["span_max"]["auroc"] > random_head["span_max"]["auroc"] + 0.2
    assert probe["span_max"]["auroc"] > report["baselines"]["nll"]["span_max"]["auroc"]
    assert set(report["baselines"]) == {"nll", "entropy", "random_head"}
    assert all(p.requires_grad is False for p in model.parameters())  # the base stayed frozen


def test_each_alignment_reads_its_own_position():
    """Labels set by the token itself: a head at the own alignment reads them, a predictive one cannot."""
    model = tiny_model(vocab_size=64, sharpen=1.0)
    aurocs = {}
    for alignment in ("own", "predictive"):
        config = ProbeTrainConfig(layer=1, alignment=alignment, steps=150, lr=1e-2, progress=False)
        head = train_probe(model, examples(64, 0, "own"), config, 0)
        aurocs[alignment] = evaluate_probe(model, head, 1, examples(32, 1, "own"), 0, alignment)["probe"]["token"]
    assert aurocs["own"]["auroc"] > 0.9 and aurocs["predictive"]["auroc"] < 0.75


def test_sweep_trains_a_head_per_layer_in_one_pass():
    model = tiny_model(vocab_size=64)
    heads = sweep(model, examples(32, 0), [0, 1], ProbeTrainConfig(layer=0, steps=40, lr=1e-2, progress=False), 0)
    assert set(heads) == {0, 1}
    assert not torch.equal(heads[0].linear.weight, heads[1].linear.weight)
    with pytest.raises(IndexError, match=r"probe layers \[7\] out of range"):
        sweep(model, examples(4, 0), [7], ProbeTrainConfig(layer=7, steps=1), 0)


def test_lora_probe_trains_adapters_only_up_to_the_probed_layer():
    model = tiny_model(vocab_size=64)
    config = ProbeTrainConfig(layer=0, steps=20, lr=1e-2, lora=LoRAConfig(r=2, dropout=0.0), kl_weight=0.5,
                              alignment="predictive", progress=False)
    train_probe(model, examples(16, 0), config, 0)
    layers = {name.split(".")[1] for name, _ in lora_layers(model)}
    assert layers == {"0"}
    assert any(m.lora_B.weight.abs().sum() > 0 for _, m in lora_layers(model))


def test_lora_probe_starts_from_the_given_head():
    from lucidlm.probe.probe import ProbeHead

    torch.manual_seed(3)
    start = ProbeHead(tiny_model(vocab_size=64).config.dim)
    frozen_lr = ProbeTrainConfig(layer=0, steps=3, lr=0.0, lora_lr=1e-2, lora=LoRAConfig(r=2, dropout=0.0),
                                 progress=False)
    head = train_probe(tiny_model(vocab_size=64), examples(8, 0), frozen_lr, 0, initial_head=start)
    assert torch.equal(head.linear.weight, start.linear.weight) and torch.equal(head.linear.bias, start.linear.bias)
    moving = train_probe(tiny_model(vocab_size=64), examples(8, 0), ProbeTrainConfig(
        layer=0, steps=3, lr=1e-2, lora=LoRAConfig(r=2, dropout=0.0), progress=False), 0, initial_head=start)
    assert not torch.equal(moving.linear.weight, start.linear.weight)
    assert (moving.linear.weight - start.linear.weight).abs().max() < 0.1  # a few steps from the start, not a reset
    with pytest.raises(ValueError, match="initial_head is for LoRA"):
        train_probe(tiny_model(vocab_size=64), examples(8, 0), ProbeTrainConfig(layer=0, steps=1), 0, start)


def test_lora_probe_directory_round_trip(tmp_path):
    import lucidlm
    from lucidlm.checkpoint.loader import load_model
    from lucidlm.probe.probe import ProbeConfig, save_probe
    from lucidlm.random_checkpoint import build_random_checkpoint

    base = build_random_checkpoint(tmp_path / "model")
    loaded = load_model(base)
    config = ProbeTrainConfig(layer=1, steps=5, lr=1e-2, lora=LoRAConfig(r=2, dropout=0.0), progress=False)
    rows = [LabeledExample(e.input_ids, e.labels, e.span_ids, e.span_labels) for e in examples(8, 0)]
    head = train_probe(loaded.model, rows, config, 0)
    save_probe(tmp_path / "probe", head, ProbeConfig(1, 256, 4, alignment="own"), loaded.model, loaded.family)
    assert (tmp_path / "probe" / "adapter_config.json").exists()
    lm = lucidlm.load(base, probe=tmp_path / "probe")
    assert lm.probe.config.has_adapter and len(list(lora_layers(lm.model))) == 2 * 7
    ids = rows[0].input_ids
    with torch.no_grad():
        out = loaded.model.forward_outputs(torch.tensor([ids]), hidden_layers=[1])
        expected = head.scores(out.hidden_states[1][0, 1:])  # own alignment: token t from h[t]
    torch.testing.assert_close(torch.tensor(lm.token_scores(ids)[1:]), expected, rtol=1e-5, atol=1e-6)


def test_lora_probe_report_uses_base_model_baselines_and_gives_the_kl_cost():
    model = tiny_model(vocab_size=64)
    data = examples(16, 3)
    plain = evaluate_probe(model, train_probe(model, data, ProbeTrainConfig(layer=1, steps=2, progress=False), 0), 1,
                           data, pad_id=0)
    assert "lora_kl_to_base" not in plain
    config = ProbeTrainConfig(layer=1, steps=30, lr=1e-2, lora_lr=1e-2, lora=LoRAConfig(r=2, dropout=0.0),
                              kl_weight=0.0, progress=False)
    head = train_probe(model, data, config, 0)
    report = evaluate_probe(model, head, 1, data, pad_id=0)
    assert report["lora_kl_to_base"] > 0  # the adapters moved the next-token distributions
    # NLL and entropy are the base model's: unchanged by the adapters
    for name in ("nll", "entropy"):
        assert report["baselines"][name]["span_max"] == pytest.approx(plain["baselines"][name]["span_max"])
