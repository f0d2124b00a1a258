"""Acting on probe scores: flag risky spans, withhold risky claims, pick the least risky sample.

- ``flagged_spans``: runs of consecutive tokens whose score passes a threshold (what a reader is
  shown, and what ``lucidlm generate --probe`` colours).
- ``lowest_max_score``: a best-of-N scorer — of N samples, keep the one whose riskiest token is
  least risky (``lm.generate(prompt, best_of=N, scorer=lowest_max_score)``).
- ``attempt_curve``: selective answering — a claim is stated only while its risk (the span's max
  score) stays under a threshold; sweeping the threshold traces accuracy of the stated claims
  against the attempt rate (the fraction stated). A perfect detector keeps accuracy at 100% until
  every true claim is stated; a useless one keeps it at the base rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..generate.events import Completion


@dataclass
class FlaggedSpan:
    start: int  # first token index
    end: int  # one past the last token
    text: str
    max_score: float


def flagged_spans(pieces: list[str], scores: list[float | None], threshold: float) -> list[FlaggedSpan]:
    """Maximal runs of tokens scoring above ``threshold`` (``pieces[i]`` is token i's text)."""
    if len(pieces) != len(scores):
        raise ValueError(f"{len(pieces)} token texts but {len(scores)} scores")
    spans: list[FlaggedSpan] = []
    start = None
    for i, s in enumerate([*scores, None]):
        risky = s is not None and s == s and s > threshold  # s == s: not NaN
        if risky and start is None:
            start = i
        elif not risky and start is not None:
            spans.append(FlaggedSpan(start, i, "".join(pieces[start:i]), max(scores[start:i])))
            start = None
    return spans


def lowest_max_score(completion: Completion) -> float:
    """Best-of-N scorer (higher is better): minus the completion's highest token score; the library's and the
    server's (serve/app.py) one scorer. A completion none of whose tokens has a score (under "own", a single token
    that filled the context) ranks last: nothing says it is safe."""
    if completion.scores is None:
        raise ValueError("the completion has no probe scores: load the model with one (lucidlm.load(..., probe=DIR))")
    scores = [s for s in completion.scores if s is not None]
    return -max(scores) if scores else float("-inf")


def attempt_curve(risk: np.ndarray, correct: np.ndarray, points: int = 21) -> list[dict]:
    """Accuracy of the claims stated vs the fraction stated, when claims are stated in order of
    increasing risk. Rows {"attempt_rate", "accuracy", "threshold"} at evenly spaced attempt rates."""
    risk, correct = np.asarray(risk, dtype=float), np.asarray(correct, dtype=bool)
    if risk.shape != correct.shape or risk.size == 0:
        raise ValueError("attempt_curve needs one risk per claim and at least one claim")
    order = np.argsort(risk, kind="stable")
    hits = np.cumsum(correct[order])
    rows = []
    for rate in np.linspace(1.0 / points, 1.0, points):
        k = max(1, int(round(rate * risk.size)))
        rows.append({"attempt_rate": k / risk.size, "accuracy": float(hits[k - 1] / k),
                     "threshold": float(risk[order[k - 1]])})
    return rows


def accuracy_at(curve: list[dict], attempt_rate: float) -> float:
    """Accuracy at the curve point closest to ``attempt_rate``."""
    return min(curve, key=lambda r: abs(r["attempt_rate"] - attempt_rate))["accuracy"]
