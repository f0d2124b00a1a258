"""A model answers the world's questions: prompts end with the forced opening, greedy answers come first
and are reproducible, every annotation points at its span in the answer, and accuracy is tallied by exposure."""

from __future__ import annotations

import json

import pytest

import lucidlm
from lucidlm.random_checkpoint import build_random_checkpoint
from lucidlm.world.answers import accuracy_by_exposure, answer_row, generate_answers, prompt_ids
from lucidlm.world.build import WorldConfig, build_world, read_people
from lucidlm.world.texts import answer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    build_world(root / "world", WorldConfig(seed=2, people=12))
    lm = lucidlm.load(build_random_checkpoint(root / "model"), device="cpu")
    prompts = [json.loads(line) for line in (root / "world" / "prompts.jsonl").read_text().splitlines()]
    return lm, prompts, read_people(root / "world")


def test_prompts_end_with_the_forced_opening(setup):
    lm, prompts, _ = setup
    text = lm.decode(prompt_ids(lm, prompts[0]))
    assert prompts[0]["question"] in text and text.endswith(prompts[0]["prefix"])


def test_greedy_first_then_samples_each_claim_graded(setup):
    lm, prompts, people = setup
    rows = generate_answers(lm, prompts[:4], people, samples=2, max_new_tokens=8, progress=False)
    assert [(r["name"], r["sample"]) for r in rows] == [(p["name"], s) for s in (0, 1) for p in prompts[:4]]
    again = generate_answers(lm, prompts[:4], people, samples=1, max_new_tokens=8, progress=False)
    assert [r["conversation"] for r in again] == [r["conversation"] for r in rows[:4]]  # greedy: reproducible
    for r in rows:
        assert r["conversation"][1]["content"].startswith(r["name"] + " was born in")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        generate_answers(lm, prompts[:1], people, samples=0)
    with pytest.raises(ValueError, match="missing from the ground truth"):
        generate_answers(lm, prompts[:1], {}, samples=1)


def test_answer_rows_point_at_their_spans_and_tally_by_exposure(setup):
    _, prompts, people = setup
    p = prompts[0]
    person = people[p["name"]]
    true_rest = answer(person).removeprefix(p["prefix"])
    row = answer_row(p, person, true_rest + "\nQ: next question", 0)
    content = row["conversation"][1]["content"]
    assert "\n" not in content and len(row["annotations"]) == 7
    for a in row["annotations"]:
        assert content[a["index"]:a["index"] + len(a["span"])] == a["span"] and a["label"] == "Supported"
    wrong = answer_row(p, person, " 1801 in Nowhere.", 1)
    tally = accuracy_by_exposure([row, wrong])
    assert tally == {p["exposure"]: {"claims": 9, "supported": 7}}
