"""RL prompt sets: training and evaluation entities are disjoint (the world's demo split, the facts benchmark's
entity split with every question of an entity on one side), the prompts are the demos' own (checked through
their prompt functions), ``knowable`` follows the ground truth, and the JSONL round trip keeps everything."""

from __future__ import annotations

import pytest

from lucidlm.apps.demo_world import split_people
from lucidlm.apps.rl_prompts import facts_rl_prompts, read_prompts_jsonl, world_rl_prompts, write_prompts_jsonl
from lucidlm.facts import answers as facts_answers
from lucidlm.facts.questions import build_questions
from lucidlm.facts.splits import split_entities
from lucidlm.jsonl import read_jsonl
from lucidlm.world import answers as world_answers
from lucidlm.world.build import WorldConfig, build_world


class QATokenizer:
    """The world demo's Q:/A: chat template, rendered by hand; records what it was asked to render."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        self.seen = [dict(m) for m in messages]
        return "".join(f"Q: {m['content']}\n" for m in messages) + ("A: " if add_generation_prompt else "")


class TextLM:
    """What the demos' prompt functions need of an LM; ``encode`` keeps the text so prompts compare as text."""

    def __init__(self) -> None:
        self.tokenizer = QATokenizer()

    def encode(self, text: str) -> str:
        return text


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(seed=3, people=16))
    return out


def test_world_prompts_respect_the_demo_split_and_the_truth(world):
    rows = {r["name"]: r for r in read_jsonl(world / "prompts.jsonl")}
    train, held_out = world_rl_prompts(world, "train", seed=3), world_rl_prompts(world, "eval", seed=3)
    names = [{p.meta["name"] for p in ps} for ps in (train, held_out)]
    assert not names[0] & names[1] and names[0] | names[1] == set(rows)
    assert tuple(names) == split_people(list(rows), 3)  # the demo's probe split, so the probe's test people stay out
    for p in train + held_out:
        r = rows[p.meta["name"]]
        assert p.messages == ({"role": "user", "content": r["question"]},)
        assert p.meta["knowable"] is (r["mentions"] > 0) and p.meta["entity"] == r["name"]
    assert {p.meta["knowable"] for p in train + held_out} == {True, False}
    with pytest.raises(ValueError, match="world split"):
        world_rl_prompts(world, "test")


def test_world_prompts_with_the_forced_prefix_are_the_demos_prompts(world, tmp_path):
    lm = TextLM()
    prompts = world_rl_prompts(world, "all", form="prefix", tokenizer=lm.tokenizer)
    rows = {r["name"]: r for r in read_jsonl(world / "prompts.jsonl")}
    for p in prompts:
        assert p.text == world_answers.prompt_ids(lm, rows[p.meta["name"]])  # head + prefix, as the demo encodes it
        assert p.meta["prefix"] == f"{p.meta['name']} was born in"
    path = write_prompts_jsonl(tmp_path / "prompts.jsonl", prompts)
    assert set(read_jsonl(path)[0]) == {"prompt", "meta"} and read_prompts_jsonl(path) == prompts
    text = world_rl_prompts(world, "all", form="text", tokenizer=lm.tokenizer)
    assert [p.text for p in text] == [f"Q: {rows[p.meta['name']]['question']}\nA:" for p in text]
    with pytest.raises(ValueError, match="tokenizer"):
        world_rl_prompts(world, "all", form="prefix")
    with pytest.raises(ValueError, match="form"):
        world_rl_prompts(world, "all", form="chat")


def test_facts_prompts_split_entities_and_ask_as_the_demo(tmp_path):
    questions = build_questions(0, {"country_capital": 24, "country_profile": 24, "element_symbol": 12},
                                ["country_capital", "country_profile", "element_symbol"])
    unknowable = {questions[0]["id"], questions[-1]["id"]}
    sides = {s: facts_rl_prompts(questions, unknowable, s, seed=1) for s in ("train", "validation", "test")}
    entities = {s: {p.meta["entity"] for p in ps} for s, ps in sides.items()}
    assert not entities["train"] & entities["test"] and not entities["train"] & entities["validation"]
    assert not entities["validation"] & entities["test"]
    assert sum(len(ps) for ps in sides.values()) == len(questions)
    assert entities == split_entities(questions, 1, (0.5, 0.15, 0.35))
    by_id = {q["id"]: q for q in questions}
    lm = TextLM()
    for p in (p for ps in sides.values() for p in ps):
        q = by_id[p.meta["id"]]
        facts_answers.prompt_ids(lm, q)
        assert list(p.messages) == lm.tokenizer.seen  # what the demo renders with the chat template
        assert p.meta["knowable"] is (q["id"] not in unknowable)
        assert {k: p.meta[k] for k in ("type", "entity", "truth")} == {k: q[k] for k in ("type", "entity", "truth")}
    given = {"train": set(), "validation": set(), "test": {questions[0]["entity"]}}
    assert [p.meta["entity"] for p in facts_rl_prompts(questions, set(), "test", splits=given)] == \
        [q["entity"] for q in questions if q["entity"] == questions[0]["entity"]]

    path = write_prompts_jsonl(tmp_path / "rl" / "prompts.jsonl", sides["train"])
    assert read_prompts_jsonl(path) == sides["train"]
    assert set(read_jsonl(path)[0]) == {"messages", "meta"}
    with pytest.raises(ValueError, match="unknown question types"):
        facts_rl_prompts([{"type": "nope"}], set())


def test_demo_facts_prompts_take_the_demos_split_and_knowledge(tmp_path):
    from typer.testing import CliRunner

    from lucidlm.apps.cli import app
    from lucidlm.jsonl import write_jsonl

    questions = build_questions(0, {"country_capital": 20, "country_profile": 20, "element_symbol": 10},
                                ["country_capital", "country_profile", "element_symbol"])
    answers = []  # two samples each; a question is right in sample 0 when its index is even, never when it is odd
    for i, q in enumerate(questions):
        for sample in (0, 1):
            label = "Supported" if i % 2 == 0 and sample == 0 else "Not Supported"
            answers.append({"id": q["id"], "type": q["type"], "entity": q["entity"], "sample": sample,
                            "annotations": [{"span": "x", "label": label, "index": 0}]})
    for part in ("questions", "answers"):
        (tmp_path / "demo" / part).mkdir(parents=True)
    write_jsonl(tmp_path / "demo" / "questions" / "questions.jsonl", questions)
    write_jsonl(tmp_path / "demo" / "answers" / "answers.jsonl", answers)
    from lucidlm.apps.rl_prompts import demo_facts_rl_prompts

    test = demo_facts_rl_prompts(tmp_path / "demo", "test", system="Say I don't know if unsure.")
    assert {p.meta["entity"] for p in test} == {q["entity"] for q in questions if q["type"] != "country_profile"
                                                and q["entity"] in split_entities(answers, 0)["test"]}
    assert {p.meta["type"] for p in test} <= {"country_capital", "element_symbol"}  # long-form left out
    wrong = {q["id"] for i, q in enumerate(questions) if i % 2}
    assert all(p.meta["knowable"] is (p.meta["id"] not in wrong) for p in test)
    assert all(p.messages[0] == {"role": "system", "content": "Say I don't know if unsure."} for p in test)
    runner = CliRunner()
    result = runner.invoke(app, ["rl-prompts", "--facts", str(tmp_path / "demo"), "--split", "test",
                                 "--out", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    assert [p.meta["id"] for p in read_prompts_jsonl(tmp_path / "p.jsonl")] == [p.meta["id"] for p in test]
    both = runner.invoke(app, ["rl-prompts", "--facts", str(tmp_path / "demo"), "--world", str(tmp_path),
                               "--out", str(tmp_path / "q.jsonl")])
    assert both.exit_code != 0 and "one of --world DIR or --facts" in both.output
    form = runner.invoke(app, ["rl-prompts", "--world", str(tmp_path), "--form", "text", "--out", "q.jsonl"])
    assert form.exit_code != 0 and "give --model" in form.output
    with pytest.raises(FileNotFoundError, match="no finished demo"):
        demo_facts_rl_prompts(tmp_path / "nothing")
