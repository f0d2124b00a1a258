"""answer_questions end to end on a tiny random model: chat-templated prompts, greedy first and reproducible,
samples seeded, every row in the probe format that label_row accepts; re-grading; accuracy per type; the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.facts.answers import answer_questions, answer_row, prompt_ids, regrade
from lucidlm.facts.questions import build_questions
from lucidlm.facts.report import accuracy_by_type
from lucidlm.probe.data import LabelStats, label_row
from lucidlm.random_checkpoint import build_random_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("facts") / "model")


@pytest.fixture(scope="module")
def lm(model_dir):
    return lucidlm.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def questions():
    return build_questions(0, 2, types=("city_country", "element_symbol"))


def test_prompt_is_the_chat_template_of_the_question(lm, questions):
    text = lm.decode(prompt_ids(lm, questions[0]))
    assert text == lm.tokenizer.apply_chat_template([{"role": "user", "content": questions[0]["question"]}],
                                                    add_generation_prompt=True)


def test_rows_greedy_first_samples_after_all_valid_probe_rows(lm, questions):
    rows = answer_questions(lm, questions, samples=3, temperature=0.9, seed=1, batch_size=2, progress=False)
    assert [(r["id"], r["sample"]) for r in rows] == [(q["id"], s) for q in questions for s in range(3)]
    greedy = answer_questions(lm, questions, samples=1, batch_size=4, progress=False)
    assert [r["conversation"] for r in greedy] == [r["conversation"] for r in rows if r["sample"] == 0]
    again = answer_questions(lm, questions, samples=3, temperature=0.9, seed=1, batch_size=2, progress=False)
    assert [r["conversation"] for r in again] == [r["conversation"] for r in rows]  # seeded samples
    texts = {r["conversation"][1]["content"] for r in rows if r["id"] == questions[0]["id"]}
    assert len(texts) > 1  # sampling at 0.9 from a random model: samples differ from the greedy answer
    stats = LabelStats()
    for r, q in zip(rows, [q for q in questions for _ in range(3)]):
        assert r["conversation"][0] == {"role": "user", "content": q["question"]}
        assert r["type"] == q["type"] and r["entity"] == q["entity"] and r["truth"] == q["truth"]
        label_row(r, lm.tokenizer, stats)
    assert stats.rows == len(rows) and stats.missing_spans == 0
    with pytest.raises(ValueError, match="samples must be >= 1"):
        answer_questions(lm, questions, samples=0)


def test_graded_rows_label_the_claimed_tokens(lm):
    q = build_questions(0, 200, types=("country_capital",))
    france = next(x for x in q if x["entity"] == "France")
    wrong = answer_row(france, " The capital of France is Lyon.\n", 1)
    assert wrong["conversation"][1]["content"] == "The capital of France is Lyon."
    assert [(a["span"], a["label"], a["value"]) for a in wrong["annotations"]] == [("Lyon", "Not Supported", "lyon")]
    ex = label_row(wrong, lm.tokenizer)
    positive = [i for i, y in enumerate(ex.labels) if y == 1]
    assert lm.decode([ex.input_ids[i] for i in positive]) == "Lyon"  # byte tokens: exactly the span
    right = answer_row(france, "Paris.", 0)
    assert right["annotations"][0]["label"] == "Supported" and 1 not in label_row(right, lm.tokenizer).labels
    broken = wrong | {"annotations": []}
    assert regrade(broken)["annotations"] == wrong["annotations"]
    table = accuracy_by_type([wrong, right, answer_row(france, "I don't know.", 2)])
    assert table == {"country_capital": {"answers": 3, "claims": 2, "supported": 1, "hedged": 1, "no_claim": 0,
                                         "accuracy": 0.5}}


def test_cli_build_answer_label(model_dir, tmp_path):
    runner = CliRunner()
    qs, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    r = runner.invoke(app, ["facts", "build", "--out", str(qs), "--per-type", "2", "--type", "element_symbol",
                            "--type", "country_capital"])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["type"] for line in qs.read_text().splitlines()] == ["element_symbol"] * 2 + [
        "country_capital"] * 2
    r = runner.invoke(app, ["facts", "answer", "--model", str(model_dir), "--questions", str(qs), "--out",
                            str(answers), "--samples", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 8 and "| element_symbol | 4 |" in r.output
    relabeled = tmp_path / "b.jsonl"
    r = runner.invoke(app, ["facts", "label", "--answers", str(answers), "--out", str(relabeled)])
    assert r.exit_code == 0, r.output
    assert [json.loads(line) for line in relabeled.read_text().splitlines()] == rows
