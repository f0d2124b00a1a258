"""Acting on scores: flagged spans, the best-of-N scorer and the accuracy-vs-attempt curve."""

from __future__ import annotations

import numpy as np
import pytest

from lucidlm.generate.events import Completion
from lucidlm.probe.selective import accuracy_at, attempt_curve, flagged_spans, lowest_max_score


def test_flagged_spans_are_maximal_runs_above_threshold():
    pieces = ["A", " was", " born", " in", " 19", "43", ".", " end"]
    scores = [float("nan"), 0.1, 0.2, 0.6, 0.9, 0.7, 0.3, 0.8]
    spans = flagged_spans(pieces, scores, 0.5)
    assert [(s.start, s.end, s.text, s.max_score) for s in spans] == [(3, 6, " in 1943", 0.9), (7, 8, " end", 0.8)]
    assert flagged_spans(pieces, scores, 0.95) == []
    with pytest.raises(ValueError, match="3 token texts but 2 scores"):
        flagged_spans(["a", "b", "c"], [0.1, 0.2], 0.5)


def test_lowest_max_score_prefers_the_least_risky_sample():
    safe = Completion([1, 2], [-0.1, -0.1], "stop", scores=[0.2, 0.3])
    risky = Completion([1, 3], [-0.01, -0.01], "stop", scores=[0.1, 0.9])
    assert max([risky, safe], key=lowest_max_score) is safe
    with pytest.raises(ValueError, match="no probe scores"):
        lowest_max_score(Completion([1], [-0.1], "stop"))
    unscored = Completion([4], [-0.01], "length", scores=[None])  # "own": one token that filled the context
    assert max([unscored, risky], key=lowest_max_score) is risky  # nothing says it is safe: last


def test_attempt_curve_matches_the_naive_count():
    rng = np.random.default_rng(0)
    risk = rng.random(200)
    correct = rng.random(200) > risk  # riskier claims are wrong more often
    curve = attempt_curve(risk, correct, points=10)
    for row in curve:
        k = round(row["attempt_rate"] * 200)
        stated = risk <= np.sort(risk)[k - 1]
        assert row["accuracy"] == pytest.approx(correct[stated].mean())
    assert curve[-1]["attempt_rate"] == 1.0 and curve[-1]["accuracy"] == pytest.approx(correct.mean())
    assert accuracy_at(curve, 0.3) > accuracy_at(curve, 1.0)  # withholding risky claims raises accuracy
    perfect = attempt_curve(~correct * 1.0, correct, points=10)  # risk 1 exactly on the wrong claims
    assert accuracy_at(perfect, 0.4) == 1.0 and correct.mean() > 0.4  # every stated claim true until they run out
    with pytest.raises(ValueError, match="at least one claim"):
        attempt_curve(np.array([]), np.array([]))
