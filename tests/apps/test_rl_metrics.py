"""Hallucination metrics on a hand example (every value computed by hand), the entity bootstrap against a
naive loop over the same draws, the knowable / known sets from sampled answers, and rollouts graded into rows."""

from __future__ import annotations

import numpy as np
import pytest

from lucidlm.apps.rl_metrics import hallucination_metrics, knowledge_sets, ratio_ci, world_unknowable
from lucidlm.apps.rl_rewards import WorldGrading, graded_row
from lucidlm.jsonl import read_jsonl
from lucidlm.train.rewards import RLPrompt, Rollout
from lucidlm.world.build import WorldConfig, build_world, read_people
from lucidlm.world.texts import abstention, answer

S, N = "Supported", "Not Supported"


def row(key: str, entity: str, labels: list[str], text: str = "An answer.") -> dict:
    return {"id": key, "entity": entity, "annotations": [{"label": x} for x in labels],
            "conversation": [{"role": "user", "content": "?"}, {"role": "assistant", "content": text}]}


ROWS = [row("a/1", "a", [S, S, N]), row("a/2", "a", [S]),
        row("b/1", "b", [], "I don't know."), row("b/1", "b", [N]),
        row("c/1", "c", [], "I know nothing about C."), row("c/1", "c", []),
        row("d/1", "d", [], "I'm not sure.")]


def test_metrics_on_a_hand_example():
    m = hallucination_metrics(ROWS, unknowable={"b/1", "c/1"}, known={"a/1", "d/1"}, n_boot=200)
    assert m["answers"] == 7
    assert m["supported_rate"]["value"] == pytest.approx(3 / 5) and m["supported_rate"]["n"] == 5
    assert m["claims_per_answer"]["value"] == pytest.approx(5 / 7)
    assert m["no_claim_rate"]["value"] == pytest.approx(1 / 7)  # c's second answer: nothing, no abstention
    assert m["abstention_unknowable"]["value"] == pytest.approx(2 / 4) and m["abstention_unknowable"]["entities"] == 2
    assert m["abstention_known"]["value"] == pytest.approx(1 / 2)  # a/1 answered, d/1 hedged
    for name in ("supported_rate", "claims_per_answer", "no_claim_rate", "abstention_unknowable", "abstention_known"):
        ci = m[name]
        assert set(ci) == {"value", "lo", "hi", "n", "entities"} and ci["lo"] <= ci["value"] <= ci["hi"]
    assert m["supported_rate"]["entities"] == 4
    empty = hallucination_metrics(ROWS, set(), set(), n_boot=10)["abstention_known"]
    assert empty["n"] == 0 and np.isnan(empty["value"])
    with pytest.raises(ValueError, match="no answer rows"):
        hallucination_metrics([], set(), set())


def test_ratio_ci_resamples_entities_like_a_naive_loop():
    rng = np.random.default_rng(5)
    numer, denom = rng.integers(0, 4, 40).astype(float), rng.integers(1, 5, 40).astype(float)
    groups = rng.choice(list("pqrstuvw"), 40)
    got = ratio_ci(numer, denom, groups, n_boot=300, seed=7, level=0.9)
    names = sorted(set(groups))
    draws = np.random.default_rng(7).integers(0, len(names), (300, len(names)))
    stats = []
    for draw in draws:
        chosen = [names[g] for g in draw]
        stats.append(sum(numer[groups == n].sum() for n in chosen) / sum(denom[groups == n].sum() for n in chosen))
    assert got["value"] == pytest.approx(numer.sum() / denom.sum())
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.quantile(stats, [0.05, 0.95])))
    same = ratio_ci(np.ones(6), np.full(6, 2.0), np.array(list("xxyyzz")), n_boot=50)
    assert same["lo"] == same["hi"] == same["value"] == 0.5  # every entity at one rate: no spread
    with pytest.raises(ValueError, match="one shape"):
        ratio_ci(np.ones(3), np.ones(2), np.ones(3))


def test_knowledge_sets_from_samples():
    rows = [row("q1", "e1", [N]), row("q1", "e1", [], "I don't know."),  # never right: unknowable
            row("q2", "e2", [S]), row("q2", "e2", [S]), row("q2", "e2", [N]),  # right 2 of 3: known
            row("q3", "e3", [S]), row("q3", "e3", [N]),  # right half the time: neither
            row("q4", "e4", [S, N]), row("q4", "e4", [S, N])]  # partly right each time: neither
    assert knowledge_sets(rows) == {"unknowable": {"q1"}, "known": {"q2"}}
    assert knowledge_sets(rows, known_share=0.4)["known"] == {"q2", "q3"}


def test_world_rollouts_graded_into_metrics(tmp_path):
    build_world(tmp_path, WorldConfig(seed=1, people=10))
    never = world_unknowable(tmp_path)
    assert never == {r["name"] for r in read_jsonl(tmp_path / "people.jsonl") if r["mentions"] == 0} and never
    people = read_people(tmp_path)
    grading = WorldGrading(people)
    rollouts = []
    for name, person in sorted(people.items()):
        text = abstention(name) if name in never else answer(person)
        rollouts.append(Rollout(RLPrompt(text="p", meta={"name": name, "knowable": name not in never}), (1,), (2,),
                                text, "stop"))
    rows = [graded_row(grading, r) for r in rollouts]
    m = hallucination_metrics(rows, never, set(people) - never, n_boot=50)
    assert m["supported_rate"]["value"] == 1.0 and m["abstention_unknowable"]["value"] == 1.0
    assert m["abstention_known"]["value"] == 0.0
    assert m["claims_per_answer"]["value"] == pytest.approx(7 * (10 - len(never)) / 10)
