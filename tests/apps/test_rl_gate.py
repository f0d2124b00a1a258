"""The post-hoc claim gate (apps/rl_gate.py) on hand-built rl-eval rows, every figure counted by hand."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from lucidlm.apps.cli import app
from lucidlm.apps.rl_gate import (
    answer_risk,
    gate_methods,
    gate_report,
    gated_rows,
    pick_tau,
    separation,
    sweep,
    thresholds,
)
from lucidlm.apps.rl_metrics import abstained
from lucidlm.jsonl import write_json


def row(qid: str, knowable: bool, labels: list[str], probe: list[float | None], nll: list[float | None]) -> dict:
    spans = [{"span": f"c{i}", "label": lab, "probe": p, "nll": n, "tokens": None}
             for i, (lab, p, n) in enumerate(zip(labels, probe, nll, strict=True))]
    return {"id": qid, "entity": qid, "knowable": knowable, "kind": "sample", "answer": " ".join(labels),
            "annotations": [{"span": f"c{i}", "label": lab} for i, lab in enumerate(labels)], "probe_spans": spans}


def base_rows() -> list[dict]:
    """k: known (3 of 3 answers right, low scores); u: unknowable (always wrong, high probe score, one answer with
    no claim); m: knowable, mixed (1 of 3 right)."""
    return ([row("k", True, ["Supported"], [0.2], [1.0]) for _ in range(3)]
            + [row("u", False, ["Not Supported"], [0.9], [1.5]) for _ in range(2)]
            + [row("u", False, [], [], [])]
            + [row("m", True, ["Supported"], [0.4], [3.0])]
            + [row("m", True, ["Not Supported", "Supported"], [0.7, 0.1], [2.0, None]) for _ in range(2)])


def test_risk_is_the_highest_scored_claim_and_unscored_spans_do_not_count():
    rows = base_rows()
    assert answer_risk(rows[6], "probe") == 0.4
    assert answer_risk(rows[7], "probe") == 0.7 and answer_risk(rows[7], "nll") == 2.0  # None is no score
    assert answer_risk(rows[5], "probe") is None  # no claim: nothing to gate
    with pytest.raises(ValueError, match="probe_spans"):
        answer_risk({"annotations": []}, "probe")
    with pytest.raises(ValueError, match="unknown gate score"):
        answer_risk(rows[0], "entropy")


def test_gating_turns_risky_answers_into_abstentions_and_leaves_the_rest():
    rows = base_rows()
    gated = gated_rows(rows, "probe", 0.5)  # gates u's two claims and m's two 0.7 answers
    assert [abstained(r) for r in gated] == [False] * 3 + [True, True, False, False, True, True]
    assert gated[3]["annotations"] == [] and gated[0] == rows[0]
    assert rows[3]["annotations"]  # the input is not changed


def test_the_sweep_runs_from_gating_everything_scored_to_nothing():
    rows = base_rows()
    taus = thresholds(rows, "probe")
    assert taus[1:] == [0.2, 0.4, 0.7, 0.9] and taus[0] < 0.2
    points = sweep(rows, "probe", None)
    first, last = points[0], points[-1]
    # everything scored gated: k's 3 answers of 3 abstain, u's 2 of 3 (one has no claim)
    assert first["abstention_known"] == 1.0 and first["abstention_unknowable"] == pytest.approx(2 / 3)
    assert math.isnan(first["supported_rate"]) and first["claims_per_answer"] == 0.0
    # nothing gated (τ = the top score): no abstention; supported 3 (k) + 1 + 2 (m) of 3 + 2 + 1 + 4 claims
    assert last["abstention_known"] == 0.0 and last["abstention_unknowable"] == 0.0
    assert last["supported_rate"] == pytest.approx(6 / 10)
    at_04 = points[2]  # τ 0.4: u's and m's 0.7 answers gated; k and m's 0.4 answer stay
    assert at_04["tau"] == 0.4 and at_04["abstention_known"] == 0.0
    assert at_04["abstention_unknowable"] == pytest.approx(2 / 3) and at_04["supported_rate"] == 1.0


def test_tau_is_the_most_unknowable_abstention_within_the_known_budget():
    rows = base_rows()
    # below 0.2 k abstains; 0.2, 0.4 and 0.7 all abstain on u's 2 claims: the tie goes to the highest τ
    assert pick_tau(rows, "probe", None, 0.0) == 0.7
    assert pick_tau(rows, "nll", None, 0.0) == 1.0  # k's claims score 1.0, below u's 1.5
    risky_known = [r | {"probe_spans": [s | {"probe": 0.95} for s in r["probe_spans"]]} if r["id"] == "k" else r
                   for r in rows]  # k now scores above u: keeping k costs every abstention on u
    assert pick_tau(risky_known, "probe", None, 0.0) == 0.95
    assert pick_tau(risky_known, "probe", None, 1.0) == 0.7


def test_report_picks_tau_on_the_tuning_rows_and_draws_the_frontier(tmp_path):
    base, tune = tmp_path / "base.json", tmp_path / "tune.json"
    write_json(base, base_rows())
    write_json(tune, base_rows())
    table, picked = gate_report(base, tune, "facts", 0.0, [base], tmp_path / "frontier.png")
    assert picked["tau"] == {"probe": 0.7, "nll": 1.0}
    lines = {line.split(" | ")[0]: line for line in table.splitlines()}
    assert "probe gate, τ 0.7" in lines["| metric"] and "nll gate, τ 1" in lines["| metric"]
    cells = lines["| abstention_unknowable"].split(" | ")
    assert cells[1].startswith("0.000") and cells[2].startswith("0.667") and cells[3].startswith("0.667")
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cli_names_a_missing_file_and_rows_without_probe_scores(tmp_path):
    base = tmp_path / "base.json"
    write_json(base, base_rows())
    runner = CliRunner()
    missing = runner.invoke(app, ["rl-gate", str(base), "--tune", str(tmp_path / "nope.json"), "--grader", "facts"])
    assert missing.exit_code != 0 and "nope.json" in missing.output
    bare = tmp_path / "bare.json"
    write_json(bare, [{k: v for k, v in r.items() if k != "probe_spans"} for r in base_rows()])
    result = runner.invoke(app, ["rl-gate", str(bare), "--tune", str(bare), "--grader", "facts"])
    assert result.exit_code != 0 and "probe_spans" in str(result.exception)
    ok = runner.invoke(app, ["rl-gate", str(base), "--tune", str(base), "--grader", "facts", "--max-known", "0"])
    assert ok.exit_code == 0, ok.output
    assert '"probe": 0.7' in ok.output


def with_question_risk(rows: list[dict], risk: dict[str, float], claims: bool = True) -> list[dict]:
    return [(r if claims else {k: v for k, v in r.items() if k != "probe_spans"}) | {"question_risk": risk[r["id"]]}
            for r in rows]


def test_the_question_gate_decides_before_the_answer_so_it_gates_answers_without_claims_too():
    rows = with_question_risk(base_rows(), {"k": 0.1, "u": 0.8, "m": 0.5})
    assert answer_risk(rows[5], "question") == 0.8  # u's answer with no claim has a question score all the same
    gated = gated_rows(rows, "question", 0.6)  # every answer to u, the claimless one included
    assert [abstained(r) for r in gated] == [False] * 3 + [True] * 3 + [False] * 3
    assert thresholds(rows, "question")[1:] == [0.1, 0.5, 0.8]
    # τ 0.5: all 3 of u's answers abstain (the claim gates reach 2 of 3), k's none
    assert pick_tau(rows, "question", None, 0.0) == 0.5
    with pytest.raises(ValueError, match="question_risk"):
        answer_risk(base_rows()[0], "question")


def test_gates_are_those_every_row_can_be_scored_by(tmp_path):
    risk = {"k": 0.1, "u": 0.8, "m": 0.5}
    assert gate_methods(base_rows()) == ["probe", "nll"]
    assert gate_methods(with_question_risk(base_rows(), risk)) == ["probe", "nll", "question"]
    assert gate_methods(with_question_risk(base_rows(), risk, claims=False)) == ["question"]
    assert gate_methods(base_rows(), with_question_risk(base_rows(), risk)) == ["probe", "nll"]  # base lacks it
    base = tmp_path / "base.json"
    write_json(base, with_question_risk(base_rows(), risk, claims=False))
    table, picked = gate_report(base, base, "facts", 0.0)
    assert picked["tau"] == {"question": 0.5}
    cells = {line.split(" | ")[0]: line.split(" | ") for line in table.splitlines()}["| abstention_unknowable"]
    assert cells[1].startswith("0.000") and cells[2].startswith("1.000")


def test_separation_is_the_auroc_of_unknowable_against_known_answers_over_the_scored_ones():
    rows = base_rows()  # known: k (3 answers at 0.2); unknowable: u (2 scored at 0.9, one without a claim)
    probe = separation(rows, "probe", None)
    assert (probe["n"], probe["positives"], probe["auroc"]) == (5, 2, 1.0)  # m is neither; u's claimless one unscored
    rows[0] = rows[0] | {"probe_spans": [rows[0]["probe_spans"][0] | {"probe": 0.95}]}  # one k answer above both u
    assert separation(rows, "probe", None)["auroc"] == pytest.approx(4 / 6)
    question = separation(with_question_risk(base_rows(), {"k": 0.3, "u": 0.3, "m": 0.9}), "question", None)
    assert (question["n"], question["auroc"]) == (6, 0.5)  # every answer has a question score; all tied
