"""A post-hoc claim gate on saved ``rl-eval --probe`` rows (``lucidlm rl-gate``): how far does the model's own
knowledge signal — the probe's or its token NLL's score of each claim — go as the decision to abstain?

    answer risk   = the highest score (probe or NLL) among its claim spans (rl_probe_eval.probe_spans), or
                    the question's own score before any answer ("question": the question probe's, rl-eval
                    --question-probe; probe/question_probe.py)
    gate at τ     = every answer whose risk > τ becomes an abstention ("I don't know."), claims dropped;
                    answers without a scored claim (an abstention, an answer with no claim) are left as they are
                    by the claim gates; the question gate decides before the answer, so it gates those too

Swept over τ, the gate traces the frontier that RL is asked to reach: abstention on the entities the model knew
(x, ≤ 5% in the issue's target) against abstention on those it cannot know (y, ≥ 50%). Which τ to use is chosen
on OTHER rows (``tune``: the base model's rows on the training entities): the highest abstention on unknowable
entities whose abstention on known ones stays ≤ ``max_known`` there, then measured on the held-out rows — the
honest version of the oracle that picks τ on the test entities themselves.

The gate scores claims after the answer is written (as a reranker would), unlike probe-guided decoding
(generate/probe_guided.py), which scores every token live and stops there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..jsonl import read_json
from ..probe.claims import auroc_ci
from .rl_eval import grading_for, known_of, metrics_table, rows_metrics, unknowable_of
from .rl_metrics import hallucination_metrics

METHODS = ("probe", "nll", "question")


def answer_risk(row: dict, method: str) -> float | None:
    """The answer's highest ``method`` score over its scored claim spans (None: no scored claim), or its
    question's score ("question")."""
    if method not in METHODS:
        raise ValueError(f"unknown gate score {method!r}: one of {METHODS}")
    if method == "question":
        if "question_risk" not in row:
            raise ValueError("a row without question_risk: the question gate needs rows from `lucidlm rl-eval "
                             "--question-probe`")
        return float(row["question_risk"])
    if "probe_spans" not in row:
        raise ValueError("a row without probe_spans: the gate needs rows from `lucidlm rl-eval --probe`")
    scores = [s[method] for s in row["probe_spans"] if s[method] is not None]
    return max(scores) if scores else None


def gated_rows(rows: list[dict], method: str, tau: float) -> list[dict]:
    """The rows with every answer whose risk > ``tau`` turned into an abstention (no claims, ``abstained``)."""
    out = []
    for row in rows:
        risk = answer_risk(row, method)
        out.append(row | {"annotations": [], "probe_spans": [], "abstained": True, "gated": True}
                   if risk is not None and risk > tau else row)
    return out


def thresholds(rows: list[dict], method: str) -> list[float]:
    """Every τ at which the gate changes on ``rows``, from gating most to gating nothing (+inf)."""
    risks = sorted({r for r in (answer_risk(row, method) for row in rows) if r is not None})
    return [float(np.nextafter(risks[0], -np.inf))] + risks if risks else [float("inf")]


def sweep(rows: list[dict], method: str, unknowable: set[str] | None) -> list[dict]:
    """[{"tau", "abstention_known", "abstention_unknowable", "supported_rate", "claims_per_answer"}] over every
    threshold of ``rows`` (the base model's: "known" from them), values without intervals."""
    unknowable, known = unknowable_of(rows, unknowable), known_of(rows)
    out = []
    for tau in thresholds(rows, method):
        m = hallucination_metrics(gated_rows(rows, method, tau), unknowable, known, n_boot=1)
        out.append({"tau": tau} | {k: m[k]["value"] for k in
                                   ("abstention_known", "abstention_unknowable", "supported_rate",
                                    "claims_per_answer")})
    return out


def pick_tau(tune: list[dict], method: str, unknowable: set[str] | None, max_known: float) -> float:
    """The τ of ``tune``'s sweep with the most abstention on unknowable entities whose abstention on known ones is
    ≤ ``max_known`` (ties: the higher τ, which gates less)."""
    points = [p for p in sweep(tune, method, unknowable)
              if not p["abstention_known"] > max_known]  # NaN (no known entity) is not a violation
    if not points:
        raise ValueError(f"no threshold keeps abstention on known entities at or below {max_known} on the tuning "
                         "rows, not even gating nothing")
    best = max(np.nan_to_num(p["abstention_unknowable"]) for p in points)
    return max(p["tau"] for p in points if np.nan_to_num(p["abstention_unknowable"]) == best)


def separation(rows: list[dict], method: str, unknowable: set[str] | None) -> dict:
    """How well ``method``'s risk tells answers about unknowable entities (1) from answers about known ones (0),
    over the answers it scores: {"auroc", "lo", "hi", "n", "positives"}, the interval over entities."""
    unknowable, known = unknowable_of(rows, unknowable), known_of(rows)
    scored = [(risk, str(r["id"]) in unknowable, str(r["id"])) for r in rows
              if str(r["id"]) in unknowable | known and (risk := answer_risk(r, method)) is not None]
    if not scored:
        return {"n": 0, "positives": 0, "auroc": float("nan"), "lo": float("nan"), "hi": float("nan")}
    risks, labels, groups = (np.array(x) for x in zip(*scored))
    return auroc_ci(risks.astype(float), labels.astype(int), groups)


def gate_report(base: str | Path, tune: str | Path, grader: str, max_known: float = 0.05,
                others: list[str | Path] = (), plot: str | Path | None = None) -> tuple[str, dict]:
    """(markdown table, {"tau": {method: τ}, "separation": {method: AUROC [CI]}}): the base rows ungated and gated
    by each method at the τ picked on ``tune``, beside ``others`` (e.g. RL models' rows, "known" from the base's);
    each gate's AUROC of unknowable vs known answers on the base rows; with ``plot``, the frontier PNG."""
    _, unknowable = grading_for(grader)
    rows, tune_rows = read_json(base), read_json(tune)
    taus = {m: pick_tau(tune_rows, m, unknowable, max_known) for m in gate_methods(rows, tune_rows)}
    named = {Path(base).stem: rows_metrics(rows, unknowable)}
    for m, tau in taus.items():
        named[f"{m} gate, τ {tau:.3g}"] = rows_metrics(gated_rows(rows, m, tau), unknowable, rows)
    for f in others:
        named[Path(f).stem] = rows_metrics(read_json(f), unknowable, rows)
    if plot is not None:
        draw_frontier(plot, {m: sweep(rows, m, unknowable) for m in taus}, named, max_known)
    apart = {m: separation(rows, m, unknowable) for m in taus}
    return metrics_table(named), {"tau": taus, "separation": apart}


def gate_methods(*row_sets: list[dict]) -> list[str]:
    """The gates every row of ``row_sets`` can be scored by: probe and NLL with probe_spans, question with
    question_risk; none is an error naming what rl-eval needs."""
    every = [row for rows in row_sets for row in rows]
    methods = (["probe", "nll"] if all("probe_spans" in r for r in every) else []) + \
              (["question"] if all("question_risk" in r for r in every) else [])
    if not methods:
        raise ValueError("these rows hold no gate score: run `lucidlm rl-eval` with --probe (probe_spans: the "
                         "claim gates) or --question-probe (question_risk: the question gate) for both the base's "
                         "and the tuning rows")
    return methods


def draw_frontier(path: str | Path, curves: dict[str, list[dict]], named: dict[str, dict], max_known: float) -> None:
    """The gates' sweeps (curves) and the named runs (points) on probe/plots.plot_abstention_frontier."""
    from ..probe.plots import plot_abstention_frontier

    xy = {f"{method} gate": [(p["abstention_known"], p["abstention_unknowable"]) for p in points]
          for method, points in curves.items()}
    at = {name: (m["abstention_known"]["value"], m["abstention_unknowable"]["value"]) for name, m in named.items()}
    plot_abstention_frontier(xy, at, path, max_known)
