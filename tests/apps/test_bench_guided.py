"""``lucidlm bench --guided`` on a tiny random model with a random probe: its abstain curve equals live abstain-mode
decoding, resample mode touches only the answers a threshold flags, grading and intervals are what they claim."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_lm import random_probe, tiny_lm

from lucidlm.apps.bench_guided import (
    GuidedBench,
    answer,
    bench_guided,
    bootstrap_point,
    graded,
    guided_table,
    plot_guided,
    run_guided_bench,
)
from lucidlm.generate.probe_guided import GuidedConfig, GuidedResult

COUNTRIES = ["France", "Peru", "Chile", "Japan"]


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm()
    lm.probe = random_probe(lm, layer=1)
    questions = [{"id": f"q{i}", "type": "country_capital", "entity": c, "truth": {"capital": ["Paris"]},
                  "question": f"What is the capital of {c}?", "aliases": []} for i, c in enumerate(COUNTRIES)]
    config = GuidedBench(questions=len(questions), k=2, temperature=1.0, quantiles=(0.5,), n_boot=50)
    report = run_guided_bench(lm, questions, config, prompt=lambda q: lm.encode(q["question"]), print_fn=lambda s: None)
    return lm, questions, report


def test_abstain_curve_equals_live_abstain_decoding(setup):
    lm, questions, report = setup
    prompts = [lm.encode(q["question"]) for q in questions]
    for point in report["abstain"]:
        live = answer(lm, questions, prompts, GuidedConfig(threshold=point["threshold"]))
        assert point["answered"] == sum(not live[i].abstained for i in range(len(questions)))
        assert point["n"] == len(questions)


def test_resample_reruns_only_flagged_answers(setup):
    _, questions, report = setup
    maxima = [a["max_score"] for a in report["answers"]["plain"]]
    for point in report["resample"]:
        flagged = sum(m > point["threshold"] for m in maxima)
        assert point["flagged"] == flagged and 0 <= point["rescued"] <= flagged
        # every unflagged answer is the plain one, so at least those are answered
        unanswered = sum(not a["answered"] for a in report["answers"]["plain"])
        assert point["answered"] >= len(questions) - flagged - unanswered
    assert report["plain"]["attempt_rate"] == 1.0  # random bytes never hedge


def test_table_and_plot(setup, tmp_path):
    _, _, report = setup
    table = guided_table(report)
    assert table.count("| abstain |") == table.count("| resample best of 2 |") == len(report["abstain"]) >= 1
    assert plot_guided(report, tmp_path / "g.png").stat().st_size > 1000


def test_graded_answers():
    question = {"type": "country_capital", "entity": "France", "truth": {"capital": ["Paris"]}, "aliases": []}

    def result(text, reason="stop"):
        return GuidedResult(text, [], [0.1], reason, [], [text])

    assert graded(question, result("The capital of France is Paris."))["correct"]
    wrong = graded(question, result("The capital of France is Lyon."))
    assert wrong["answered"] and not wrong["correct"]
    assert not graded(question, result("I don't know.", "abstain"))["answered"]
    assert not graded(question, result("I'm not sure, sorry."))["answered"]  # a hedge is an abstention


def test_bootstrap_point():
    entities = np.array(["a", "a", "b", "c"])
    answered = np.array([True, False, True, True])
    correct = np.array([True, False, False, True])
    p = bootstrap_point(entities, answered, correct, n_boot=200, seed=0)
    assert p["attempt_rate"] == 0.75 and p["accuracy"] == pytest.approx(2 / 3)
    assert p["accuracy_lo"] <= p["accuracy"] <= p["accuracy_hi"] and p["attempt_lo"] <= 0.75 <= p["attempt_hi"]
    same = bootstrap_point(entities, np.ones(4, bool), np.ones(4, bool), n_boot=50, seed=0)
    assert same["accuracy_lo"] == same["accuracy_hi"] == 1.0


def test_bad_bench_config_is_named():
    for fields, message in [(dict(questions=0), "questions"), (dict(quantiles=(1.5,)), "quantiles"),
                            (dict(temperature=0.0), "temperature")]:
        with pytest.raises(ValueError, match=message):
            GuidedBench(**fields)


def test_without_a_finished_demo_the_bench_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished demo"):
        bench_guided(GuidedBench(demo=tmp_path, out=tmp_path / "out"))
