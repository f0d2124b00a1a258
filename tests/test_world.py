"""The synthetic world: seeded, power-law exposure with unseen people absent, exact labels for answers."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from lucidlm.world.build import WorldConfig, bucket, build_world, generate, read_people
from lucidlm.world.labeler import annotate
from lucidlm.world.texts import answer, qa_document


def test_same_seed_same_world_and_exposure_buckets(tmp_path):
    a, b = generate(WorldConfig(seed=1)), generate(WorldConfig(seed=1))
    assert a.documents == b.documents and a.people == b.people
    assert generate(WorldConfig(seed=2)).documents != a.documents
    # the default, the exact-label sandbox: half never mentioned, the others 1-4 times, 2x strangers
    assert len(a.people) == 200 and max(a.mentions) == 4
    buckets = Counter(bucket(m) for m in a.mentions)
    assert buckets == {"0": 100, "1": 50, "2-4": 50}
    assert sum("I know nothing about" in d for d in a.documents) == 400
    corpus = "\n".join(a.documents)
    for person, m in zip(a.people, a.mentions):
        assert (person.name in corpus) == (m > 0)  # the unseen are never mentioned
        assert any(d == qa_document(person) for d in a.documents) == (m > 0)  # a first mention: the Q&A
    firsts = Counter(p.name.split()[0] for p in a.people)
    assert firsts.most_common(1)[0][1] >= 5  # similar names: many people share a first name


def test_power_law_world_of_the_old_demo():
    old = generate(WorldConfig(seed=1, people=240, unseen=0.2, max_mentions=24, strangers=0.0))
    buckets = Counter(bucket(m) for m in old.mentions)
    assert buckets == {"0": 48, "1": 48, "2-4": 48, "5+": 96} and max(old.mentions) == 24
    assert not any("I know nothing about" in d for d in old.documents)
    once = generate(WorldConfig(seed=1, people=10, unseen=0.3, max_mentions=1, strangers=0.0))
    assert sorted(once.mentions) == [0] * 3 + [1] * 7
    for bad in ({"unseen": 1.5}, {"max_mentions": 0}):
        with pytest.raises(ValueError):
            generate(WorldConfig(seed=1, people=10, **bad))


def test_files_and_ground_truth(tmp_path):
    world = build_world(tmp_path, WorldConfig(seed=0, people=40))
    people = read_people(tmp_path)
    assert set(people) == {p.name for p in world.people}
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 40 and all(p["prefix"].startswith(p["name"]) for p in prompts)
    sft = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert len(sft) == sum(m > 0 for m in world.mentions)
    assert len(list((tmp_path / "corpus").glob("*.txt"))) == 4


def test_labeler_marks_exactly_the_wrong_values():
    person = generate(WorldConfig(seed=0, people=10)).people[0]
    true = answer(person)
    assert [a["label"] for a in annotate(person, true)] == ["Supported"] * 7
    wrong = answer(replace(person, birth_year=person.birth_year + 1, employer="Nowhere Inc"))
    notes = {a["attribute"]: a for a in annotate(person, wrong)}
    bad = {k for k, a in notes.items() if a["label"] == "Not Supported"}
    assert bad == {"birth_year", "employer"}
    for a in notes.values():
        assert wrong[a["index"]:a["index"] + len(a["span"])] == a["span"]
    partial = f"{person.name} was born in 1800 in Atlantis. That is all."
    assert [(a["attribute"], a["label"]) for a in annotate(person, partial)] == [
        ("birth_year", "Not Supported"), ("birthplace", "Not Supported")]


def test_world_build_cli(tmp_path):
    from typer.testing import CliRunner

    from lucidlm.apps.cli import app

    result = CliRunner().invoke(app, ["world", "build", "--out", str(tmp_path / "w"), "--seed", "5", "--people", "50"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["people"] == 50 and sum(summary["exposure"].values()) == 50
    assert (tmp_path / "w" / "corpus" / "world-00.txt").exists()


def test_fact_checks_mark_exactly_the_swapped_values():
    import random
    import re

    from lucidlm.world.build import alternative_values
    from lucidlm.world.texts import fact_check

    people = generate(WorldConfig(seed=3, people=30)).people
    person = people[0]
    truth = answer(person)
    for seed in range(5):
        text = fact_check(person, random.Random(seed), alternative_values(people))
        verdicts = re.findall(r" \[(true|false)\]", text)
        assert len(verdicts) == 7
        clean = re.sub(r" \[(true|false)\]", "", text).removeprefix("Fact check: ")
        notes = annotate(person, clean)  # the labeler agrees with every verdict
        assert [a["label"] == "Supported" for a in notes] == [v == "true" for v in verdicts]
        assert (clean == truth) == all(v == "true" for v in verdicts)


def test_strangers_are_outside_the_world_and_answered_honestly():
    world = generate(WorldConfig(seed=4, people=60, strangers=0.5))
    unknown = [d for d in world.documents if "I know nothing about" in d]
    assert len(unknown) == 30
    names = {p.name for p in world.people}
    for doc in unknown:
        stranger = doc.split("Tell me about ")[1].split(".")[0]
        assert stranger not in names and doc.count(stranger) == 2
