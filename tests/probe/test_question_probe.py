"""The question probe (P(IK)): batched states equal each prompt's own forward, the folded head equals scikit-learn's
standardised logistic regression, selection finds the informative layer with out-of-fold scores computed fold by
fold here, and the directory round-trips and is refused where a token probe is wanted (and vice versa)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from tiny_lm import random_probe, tiny_lm

from lucidlm.probe.probe import ProbeError, load_probe, save_probe
from lucidlm.probe.question_probe import (
    fit_question_probe,
    folded_head,
    load_question_probe,
    question_states,
    save_question_probe,
)

PROMPTS = [[5, 9, 2, 7, 1], [4, 8], [3, 3, 3, 3, 3, 3, 3, 3], [6], [1, 2, 3]]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_batched_states_are_each_prompts_last_token_alone():
    lm = tiny_lm()
    states = question_states(lm.model, PROMPTS, [0, 1], pad_id=258, batch_size=3)
    for i, ids in enumerate(PROMPTS):
        with torch.no_grad():
            alone = lm.model.forward_outputs(torch.tensor([ids]), hidden_layers=[0, 1]).hidden_states
        for layer in (0, 1):
            torch.testing.assert_close(states[layer][i], alone[layer][0, -1].float(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="non-empty"):
        question_states(lm.model, [[1], []], [0], pad_id=258)


def data(n: int = 60, dim: int = 8, seed: int = 0):
    """Layer 3 carries the label along one direction (noisy), layer 1 is noise."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    signal = rng.normal(size=(n, dim)) * 2 + 5
    signal[:, 2] += 1.5 * (2 * labels - 1)
    return {1: torch.tensor(rng.normal(size=(n, dim)), dtype=torch.float32),
            3: torch.tensor(signal, dtype=torch.float32)}, labels


def test_the_folded_head_scores_as_the_standardised_regression():
    states, labels = data()
    x = states[3].numpy()
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(x), labels)
    head = folded_head(x, labels, 0.1)
    np.testing.assert_allclose(head.scores(states[3]).numpy(),
                               reference.predict_proba(scaler.transform(x))[:, 1], atol=1e-5)


def test_selection_picks_the_informative_layer_with_honest_out_of_fold_scores():
    states, labels = data()
    fit = fit_question_probe(states, labels, folds=4, seed=0, c_grid=(0.01, 1.0), repeats=3)
    assert fit.layer == 3 and fit.cv_auroc[3] > 0.8 > fit.cv_auroc[1]
    # each score from models fit without its row, averaged over the 3 splits: the folds redone here
    x = states[3].numpy()
    expected = np.zeros(len(labels))
    for repeat in range(3):
        for train, test in StratifiedKFold(4, shuffle=True, random_state=repeat).split(x, labels):
            scaler = StandardScaler().fit(x[train])
            clf = LogisticRegression(C=fit.c, max_iter=5000).fit(scaler.transform(x[train]), labels[train])
            expected[test] += clf.predict_proba(scaler.transform(x[test]))[:, 1] / 3
    np.testing.assert_allclose(fit.out_of_fold, expected, atol=1e-6)


def test_too_few_questions_of_a_class_is_an_error_naming_the_counts():
    states, labels = data(n=10)
    labels = np.array([1, 1, 1] + [0] * 7)
    with pytest.raises(ValueError, match="7 and 3"):
        fit_question_probe(states, labels, folds=5)


def test_the_directory_round_trips_and_each_kind_is_refused_where_the_other_is_wanted(tmp_path):
    lm = tiny_lm()
    states = question_states(lm.model, PROMPTS * 4, [1], pad_id=258)
    labels = np.array([0, 1] * 10)
    fit = fit_question_probe(states, labels, folds=2, c_grid=(1.0,))
    ids = [f"q{i}" for i in range(20)]
    save_question_probe(tmp_path / "q", fit, ids, lm.model)
    probe = load_question_probe(tmp_path / "q", lm.model)
    assert probe.config.layer == 1
    torch.testing.assert_close(probe.head.linear.weight, fit.head.linear.weight)
    # trained ids: their out-of-fold score; a new question: the head's
    risks = probe.risks(lm.model, ["q3", "new"], [PROMPTS[3], PROMPTS[0]], pad_id=258)
    assert risks[0] == pytest.approx(fit.out_of_fold[3])
    assert risks[1] == pytest.approx(float(fit.head.scores(states[1][0])))
    with pytest.raises(ProbeError, match="a question probe"):
        load_probe(tmp_path / "q")  # a token probe's loader (rl-eval --probe, lucidlm.load(probe=)) refuses it
    token = random_probe(lm, 1)
    save_probe(tmp_path / "t", token.head, token.config, lm.model)
    with pytest.raises(ProbeError, match="not a question probe"):
        load_question_probe(tmp_path / "t", lm.model)
    with pytest.raises(ProbeError, match="another model"):
        load_question_probe(tmp_path / "q", tiny_lm(seed=1).model)
    (tmp_path / "q" / "question_probe.json").write_text('{"out_of_fold": {"q1": true}}')
    with pytest.raises(ProbeError, match="question_probe.json: expected"):
        load_question_probe(tmp_path / "q", lm.model)
