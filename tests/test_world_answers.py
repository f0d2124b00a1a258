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


# --- the abstention score: P(the model starts its answer with "I know nothing about") on the question ---
QA = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: "
      "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")


@pytest.fixture(scope="module")
def byte_lm():
    from tiny_lm import tiny_lm

    lm = tiny_lm(seed=3)
    lm.tokenizer.chat_template = QA  # the world demo's Q:/A: template, on the byte tokenizer
    return lm


def test_abstention_is_read_on_the_question_without_the_forced_opening(byte_lm):
    from lucidlm.world.abstention import abstention_context

    ctx, opening = abstention_context(byte_lm, "Tell me about Ada Vance.")
    assert byte_lm.decode(ctx, skip_special_tokens=True) == "Q: Tell me about Ada Vance.\nA:"
    assert byte_lm.decode(opening) == " I know nothing about"  # the template's trailing space starts it


def test_abstention_probability_matches_a_hand_computation(byte_lm):
    import math

    import torch

    from lucidlm.world.abstention import abstention_logprob, abstention_scores
    from lucidlm.world.texts import ABSTENTION_OPENING

    question = "Tell me about Ada Vance."
    context = f"Q: {question}\nA:"
    ids = byte_lm.encode(context + " " + ABSTENTION_OPENING)
    n = len(byte_lm.encode(context))
    hand = []  # log p(token k | tokens < k), one forward per prefix
    with torch.no_grad():
        for k in range(n, len(ids)):
            logits = byte_lm.model(torch.tensor([ids[:k]]))
            hand.append(float(torch.log_softmax(logits[0, -1].double(), -1)[ids[k]]))
    assert abstention_logprob(byte_lm, question) == pytest.approx(sum(hand), abs=1e-4)
    assert abstention_logprob(byte_lm, question, tokens=2) == pytest.approx(sum(hand[:2]), abs=1e-4)
    scores = abstention_scores(byte_lm, [question, "Tell me about Bela Holm.", question])
    assert list(scores) == [question, "Tell me about Bela Holm."]  # one score per distinct question
    assert scores[question] == pytest.approx(math.exp(sum(hand)), rel=1e-3)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        abstention_logprob(byte_lm, question, tokens=0)
