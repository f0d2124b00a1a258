"""Claim-level evaluation: AUROC against sklearn, bootstrap over entities, the model-free baselines by hand,
and claims mapped back to the rows they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lucidlm.probe.claims import (
    Claims,
    add_sample_disagreement,
    add_value_prior,
    auroc,
    auroc_ci,
    claims,
    claims_report,
    value_disjoint,
)
from lucidlm.probe.features import TokenFeatures


def test_rank_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    labels = (rng.random(300) < 0.4).astype(int)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_bootstrap_interval_resamples_entities():
    rng = np.random.default_rng(1)
    scores = rng.random(200)
    labels = (scores + rng.normal(0, 0.4, 200) > 0.5).astype(int)
    by_claim = auroc_ci(scores, labels, np.arange(200), n_boot=300)
    assert by_claim["lo"] < by_claim["auroc"] < by_claim["hi"]
    # the same claims copied 5 times under one entity each: no more information, so the interval must
    # stay as wide as before (a claim-level bootstrap would shrink it by about sqrt(5))
    copies = auroc_ci(np.repeat(scores, 5), np.repeat(labels, 5), np.repeat(np.arange(200), 5), n_boot=300)
    assert copies["auroc"] == pytest.approx(by_claim["auroc"])
    assert copies["hi"] - copies["lo"] > 0.7 * (by_claim["hi"] - by_claim["lo"])
    assert np.isnan(auroc_ci(scores, np.ones(200, int), np.arange(200))["auroc"])  # one class: no AUROC


def _claims(types, values, labels, samples=None, ids=None, entities=None) -> Claims:
    n = len(labels)
    meta = {"type": np.array(types), "value": np.array(values), "entity": np.array(entities or [f"e{i}" for i in
                                                                                              range(n)]),
            "id": np.array(ids or [f"q{i}" for i in range(n)]), "sample": np.array(samples or [0] * n),
            "attribute": np.array(types)}
    return Claims(meta, np.array(labels), {"probe": np.linspace(0, 1, n)})


def test_value_prior_is_the_smoothed_training_error_rate_of_the_value():
    train = _claims(["city"] * 4 + ["element"], ["China", "China", "China", "Peru", "Fe"], [1, 1, 0, 0, 0])
    test = _claims(["city", "city", "element"], ["China", "Chile", "China"], [1, 0, 0])
    add_value_prior(test, train)
    city_rate = 3 / 4 * 0 + 2 / 4  # 2 of the 4 city claims were wrong
    assert test.scores["value_prior"].tolist() == pytest.approx([(2 + city_rate) / (3 + 1), city_rate, 0.0])
    assert value_disjoint(test, train).tolist() == [False, True, True]  # China was never an element's value


def test_sample_disagreement_counts_samples_that_do_not_repeat_the_greedy_value():
    def row(q, sample, value):
        ann = [] if value is None else [{"span": value, "label": "Supported", "index": 0, "value": value}]
        return {"id": q, "type": "city", "entity": q, "sample": sample, "annotations": ann}

    rows = [row("a", 0, "Peru"), row("a", 1, "Peru"), row("a", 2, "Chile"), row("a", 3, None),
            row("b", 0, "Spain"), row("b", 1, "Spain")]
    test = _claims(["city"] * 3, ["Peru", "Spain", "Chile"], [0, 0, 1], samples=[0, 0, 2], ids=["a", "b", "a"])
    add_sample_disagreement(test, rows)
    got = test.scores["sample_disagreement"]
    assert got[:2].tolist() == pytest.approx([2 / 3, 0.0]) and np.isnan(got[2])  # a hedge disagrees too


def test_claims_map_spans_back_to_their_rows_and_report_by_type():
    rows = [{"type": "city", "entity": "Lima", "id": "q0", "sample": 0,
             "annotations": [{"span": "Peru", "value": "Peru"}]},
            {"type": "element", "entity": "Iron", "id": "q1", "sample": 0,
             "annotations": [{"span": "Fe", "value": "Fe"}, {"span": "26", "value": "26", "attribute": "number"}]}]
    feats = TokenFeatures(hidden={}, labels=torch.tensor([0, 1, 0, 0, 1]), span=torch.tensor([-1, 0, 1, 2, 2]),
                          example=torch.tensor([0, 0, 1, 1, 1]), nll=torch.tensor([0.1, 2.0, 0.3, 0.5, 4.0]),
                          entropy=torch.zeros(5), span_labels=torch.tensor([1, 0, 1]),
                          span_example=torch.tensor([0, 1, 1]), span_index=torch.tensor([0, 0, 1]))
    c = claims(rows, feats, {"nll": feats.nll})
    assert c.meta["entity"].tolist() == ["Lima", "Iron", "Iron"]
    assert c.meta["attribute"].tolist() == ["city", "element", "number"]
    assert c.labels.tolist() == [1, 0, 1] and c.scores["nll"].tolist() == pytest.approx([2.0, 0.3, 4.0])
    rep = claims_report(c, ["nll"], n_boot=50)
    assert rep["all"]["claims"] == 3 and rep["all"]["nll"]["auroc"] == 1.0
    assert rep["by_type"]["element"]["accuracy"] == 0.5 and rep["by_type"]["element"]["nll"]["auroc"] == 1.0
    assert np.isnan(rep["by_type"]["city"]["nll"]["auroc"])  # one claim, one class
