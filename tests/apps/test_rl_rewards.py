"""The verifiable reward on hand-written answers, against values computed by hand from the reward's table:
a tiny built world (supported and wrong claims, abstentions on a person never in the corpus, on a stranger
and on a known person, an empty answer, the forced prefix) and real facts questions (one-claim and long-form,
hedges); the SPEC parser and the weighted sum."""

from __future__ import annotations

import pytest

from lucidlm.apps.rl_rewards import (
    REWARD_FACTORIES,
    FactsGrading,
    VerifiableReward,
    VerifiableRewardConfig,
    WorldGrading,
    is_abstention,
    verifiable_score,
)
from lucidlm.facts import sources
from lucidlm.facts.questions import question_of
from lucidlm.jsonl import read_jsonl
from lucidlm.train.rewards import RLPrompt, Rollout
from lucidlm.world.build import WorldConfig, build_world, read_people
from lucidlm.world.texts import abstention, answer


def rollout(meta: dict, text: str) -> Rollout:
    return Rollout(RLPrompt(text="p", meta=meta), (1,), (2,), text, "stop")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(seed=0, people=12))
    mentions = {r["name"]: r["mentions"] for r in read_jsonl(out / "people.jsonl")}
    people = read_people(out)
    seen = next(people[n] for n in sorted(people) if mentions[n] > 0)
    unseen = next(people[n] for n in sorted(people) if mentions[n] == 0)
    return out, seen, unseen


def world_meta(person, knowable: bool) -> dict:
    return {"name": person.name, "knowable": knowable}


def test_world_reward_on_hand_written_answers(world):
    out, seen, unseen = world
    reward = REWARD_FACTORIES["world"](str(out), None)
    p = seen
    one_right = f"{p.name} was born in {p.birth_year}."  # only the birth-year pattern matches
    one_wrong = f"{p.name} was born in {p.birth_year + 1}."
    full = answer(p)  # all seven attributes, right
    six_and_a_wrong_award = full.replace(p.award, "Nonexistent Prize")
    rollouts = [rollout(world_meta(p, True), one_right), rollout(world_meta(p, True), one_wrong),
                rollout(world_meta(p, True), full), rollout(world_meta(p, True), six_and_a_wrong_award),
                rollout(world_meta(unseen, False), abstention(unseen.name)),
                rollout(world_meta(p, True), abstention(p.name)),
                rollout(world_meta(p, True), ""),
                rollout(world_meta(unseen, False), answer(unseen).replace(str(unseen.birth_year), "1900"))]
    # defaults: +1 / −1 per claim, abstain +1 (unknowable) / −0.5 (knowable), no claim −1
    assert reward(rollouts) == [1.0, -1.0, 7.0, 5.0, 1.0, -0.5, -1.0, 6.0 - 1.0]
    mean = VerifiableReward(WorldGrading(read_people(out)), VerifiableRewardConfig(aggregate="mean", claim_bonus=0.1))
    assert mean(rollouts[:4]) == pytest.approx([1.1, -0.9, 1.7, 5 / 7 + 0.7])


def test_world_reward_reads_the_prefix_a_first_line_and_strangers(world):
    out, seen, _ = world
    grading = WorldGrading(read_people(out))
    reward = VerifiableReward(grading)
    prefixed = {"name": seen.name, "knowable": True, "prefix": f"{seen.name} was born in"}
    stranger = {"name": "Nobody Anywhere", "knowable": False, "stranger": True}
    texts = [(prefixed, f" {seen.birth_year}.\n{seen.name} studied nothing."),
             (stranger, abstention("Nobody Anywhere")), (stranger, answer(seen).replace(seen.name, "Nobody Anywhere"))]
    assert reward([rollout(m, t) for m, t in texts]) == [1.0, 1.0, -7.0]  # every claim about a stranger is wrong
    with pytest.raises(ValueError, match="not in the world's people"):
        reward([rollout({"name": "Nobody Anywhere", "knowable": False}, "x")])
    with pytest.raises(ValueError, match="'knowable'"):
        reward([rollout({"name": seen.name}, "x")])


def facts_meta(type_name: str, name: str, knowable: bool = True) -> dict:
    pool = sources.elements() if type_name.startswith("element") else sources.countries()
    entity = next(e for e in pool.values() if e.name == name)
    return question_of(type_name, entity) | {"knowable": knowable}


def test_facts_reward_on_hand_written_answers():
    reward = REWARD_FACTORIES["facts"]("", None)
    capital, profile = facts_meta("country_capital", "France"), facts_meta("country_profile", "France")
    symbol = facts_meta("element_symbol", "Gold", knowable=False)
    cases = [(capital, "The capital of France is Paris.", 1.0), (capital, "The capital of France is Lyon.", -1.0),
             (profile, "France: its capital is Paris, it is in Europe, and its currency is the Euro.", 3.0),
             (profile, "France's capital is Paris. It is in Asia, and its currency is the euro.", 1.0),
             (symbol, "I don't know the symbol of gold.", 1.0),  # a hedge on what it cannot know
             (capital | {"knowable": True}, "I'm not sure.", -0.5),  # a hedge on what it can know
             (capital, "France is a beautiful country.", -1.0),  # no claim, no abstention
             (symbol, "The symbol of gold is Au.", 1.0)]  # right is right, knowable or not
    assert reward([rollout(m, t) for m, t, _ in cases]) == [v for _, _, v in cases]
    with pytest.raises(ValueError, match="not a facts question"):
        FactsGrading().grade({"type": "nope", "entity": "x", "truth": {}}, "x")


def test_abstention_and_score_table():
    assert is_abstention("I know nothing about Ada Vance.") and is_abstention("I don't know.")
    assert not is_abstention("Ada Vance was born in 1950.")
    c = VerifiableRewardConfig(supported=2.0, unsupported=-3.0, abstain_unknowable=0.7, abstain_known=0.1,
                               no_claim=-0.2)
    assert verifiable_score(["Supported", "Not Supported", "Supported"], True, False, c) == 2 + 2 - 3  # claims win
    assert verifiable_score([], True, False, c) == 0.7 and verifiable_score([], True, True, c) == 0.1
    assert verifiable_score([], False, False, c) == -0.2
    with pytest.raises(ValueError, match="aggregate"):
        VerifiableRewardConfig(aggregate="max")


def test_factories_check_their_argument(world):
    out, seen, _ = world
    assert REWARD_FACTORIES["world"](str(out), None).name == "world"
    with pytest.raises(ValueError, match="world:WORLD_DIR"):
        REWARD_FACTORIES["world"]("", None)
    with pytest.raises(FileNotFoundError, match="people.jsonl"):
        REWARD_FACTORIES["world"](str(out / "corpus"), None)
    with pytest.raises(ValueError, match="takes no argument"):
        REWARD_FACTORIES["facts"]("x", None)
    with pytest.raises(ValueError, match="probe:PROBE_DIR"):
        REWARD_FACTORIES["probe"]("", None)
