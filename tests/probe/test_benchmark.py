"""The claims benchmark end to end on a tiny model: selection sees only train/validation, the test report
has every method, per type and value-disjoint blocks, and a probe learns what its layer can see."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tiny_lm import tiny_lm

from lucidlm.probe.benchmark import BenchmarkConfig, held_out_auroc, run_benchmark
from lucidlm.probe.probe import ProbeConfig

WRONG = ("zq", "xv")  # claimed values that are false wherever they are claimed
VALUES = ("ab", "cd", "ef", "gh", *WRONG)


def _rows(n: int, seed: int) -> list[dict]:
    """Answers "The answer is <value>." to questions about entities of two types, two answers per question."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        entity, qtype = f"ent{seed}-{i}", ("alpha", "beta")[i % 2]
        for sample in range(2):
            value = rng.choice(VALUES)
            answer = f"The answer is {value}."
            rows.append({"id": f"q{seed}-{i}", "type": qtype, "entity": entity, "sample": sample,
                         "conversation": [{"role": "user", "content": f"What about {entity}?"},
                                          {"role": "assistant", "content": answer}],
                         "annotations": [{"span": value, "index": answer.index(value), "value": value,
                                          "label": "Not Supported" if value in WRONG else "Supported"}]})
    return rows


def test_benchmark_reports_every_method_on_held_out_entities():
    lm = tiny_lm()
    split = {"train": _rows(60, 0), "val": _rows(20, 1), "test": _rows(30, 2)}
    config = BenchmarkConfig(layers=(0, 1), steps=150, n_boot=100)
    result = run_benchmark(lm.model, lm.tokenizer, split, pad_id=258, config=config)
    report = result.report
    assert {(r["alignment"], r["layer"]) for r in report["selection_table"]} >= {("own", 0), ("own", 1),
                                                                                ("predictive", 0), ("predictive", 1)}
    chosen = report["choice"]
    assert chosen["alignment"] in ("own", "predictive") and chosen["layer"] in (0, 1)
    assert report["choice"]["other_alignment"]["alignment"] != chosen["alignment"]
    greedy = report["greedy"]
    assert greedy["all"]["claims"] == 30  # one greedy claim per test question
    assert set(greedy["by_type"]) == {"alpha", "beta"}
    for method in ("probe", "probe_other_alignment", "nll", "entropy", "value_prior", "sample_disagreement",
                   "random_head"):
        m = greedy["all"][method]
        assert m["lo"] <= m["auroc"] <= m["hi"], method
    # the claimed value decides the label: the probe reads the value's tokens, the prior learns the values
    assert greedy["all"]["probe"]["auroc"] > 0.9 and greedy["all"]["value_prior"]["auroc"] > 0.9
    # every test value was claimed in training: nothing is value-disjoint
    assert report["value_disjoint"]["all"]["claims"] == 0
    assert report["best_of_n"]["lowest max probe"]["claim_accuracy"] >= report["best_of_n"]["greedy"][
        "claim_accuracy"]
    assert np.isfinite(report["choice"]["val_auroc"])


def test_a_probe_re_measured_on_the_same_model_gives_the_benchmarks_headline():
    """held_out_auroc (what ``bench --quant`` runs per format) against run_benchmark's own test report."""
    lm = tiny_lm()
    split = {"train": _rows(60, 0), "val": _rows(20, 1), "test": _rows(30, 2)}
    result = run_benchmark(lm.model, lm.tokenizer, split, pad_id=258,
                           config=BenchmarkConfig(layers=(1,), alignments=("own",), steps=150, n_boot=100))
    probe = ProbeConfig(result.selection.config.layer, lm.config.dim, lm.config.n_layers, alignment="own")
    again = held_out_auroc(lm.model, lm.tokenizer, result.head, probe, split["test"], 258, n_boot=100)
    for method in ("probe", "nll"):
        assert again[method] == pytest.approx(result.report["greedy"]["all"][method]), method


def test_benchmark_refuses_a_split_without_both_classes():
    lm = tiny_lm()
    rows = [r for r in _rows(20, 0) if r["annotations"][0]["label"] == "Supported"]
    with pytest.raises(ValueError, match="needs both classes"):
        run_benchmark(lm.model, lm.tokenizer, {"train": rows, "val": rows, "test": rows}, 258,
                      BenchmarkConfig(layers=(0,), steps=5, n_boot=10))


def _naive_kl(base, adapted, example) -> list[float]:
    """KL(p_base ‖ p_adapted) of each kept token's predicting distribution, one conversation at a time."""
    import torch

    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        log_p = torch.log_softmax(base(ids)[0].float(), -1)
        log_q = torch.log_softmax(adapted(ids)[0].float(), -1)
    out = []
    for t in range(1, len(example.input_ids)):
        if example.labels[t] != -100 or example.span_ids[t] >= 0:
            out.append(float((log_p[t - 1].exp() * (log_p[t - 1] - log_q[t - 1])).sum()))
    return out


def test_benchmark_lora_probe_reports_its_kl_and_leaves_the_model_unadapted():
    import torch

    from lucidlm.model.lora import LoRAConfig
    from lucidlm.probe.data import label_row

    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    split = {"train": _rows(40, 0), "val": _rows(16, 1), "test": _rows(20, 2)}
    config = BenchmarkConfig(layers=(1,), alignments=("own",), steps=100, n_boot=50,
                             lora=LoRAConfig(r=4, alpha=8, dropout=0.0), lora_steps=30, lora_lr=1e-2)
    result = run_benchmark(lm.model, lm.tokenizer, split, pad_id=258, config=config)
    # the caller's model is untouched: no adapters, same weights
    assert getattr(lm.model, "lora_config", None) is None
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    lora = result.report["lora"]
    assert lora["layer"] == result.report["choice"]["layer"] and lora["steps"] == 30
    kls = [kl for r in split["test"] for kl in _naive_kl(lm.model, result.lora_model, label_row(r, lm.tokenizer))]
    assert lora["kl_test"] > 0
    assert lora["kl_test"] == pytest.approx(float(np.mean(kls)), rel=1e-3)
    m = result.report["greedy"]["all"]["probe_lora"]
    assert m["lo"] <= m["auroc"] <= m["hi"]
    assert m["auroc"] > 0.8  # the value's tokens decide the label: the adapted layer still shows them
