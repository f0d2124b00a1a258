"""Questions: the same for a seed, different for another, one per entity and type, with gradable truth."""

from __future__ import annotations

import pytest

from lucidlm.facts import sources
from lucidlm.facts.questions import DEFAULT_TYPES, TYPES, build_questions, entities_for


def test_deterministic_for_a_seed_and_unique_per_type():
    a = build_questions(3, 40, types=list(TYPES))
    assert a == build_questions(3, 40, types=list(TYPES))
    assert a != build_questions(4, 40, types=list(TYPES))
    for t in TYPES:
        mine = [q for q in a if q["type"] == t]
        assert len(mine) == 40
        assert len({q["entity"] for q in mine}) == 40 and len({q["id"] for q in mine}) == 40
        for q in mine:
            assert q["entity"] in q["question"] and q["question"] == TYPES[t].template.format(name=q["entity"])


def test_per_type_dict_caps_at_the_pool_and_rejects_unknown_types():
    qs = build_questions(0, {"element_symbol": 500, "country_capital": 5}, types=("element_symbol", "country_capital"))
    assert sum(q["type"] == "element_symbol" for q in qs) == len(sources.elements()) == 118
    assert sum(q["type"] == "country_capital" for q in qs) == 5
    assert {q["type"] for q in build_questions(0, 2)} == set(DEFAULT_TYPES)
    with pytest.raises(ValueError, match="unknown question types"):
        build_questions(0, 1, types=("nope",))


def test_truth_comes_from_the_data_packages():
    by_id = {q["id"]: q for q in build_questions(0, 1000, types=("country_capital", "element_year",
                                                                 "element_profile", "country_continent"))}
    assert by_id["country_capital/France"]["truth"] == {"capital": ["Paris"]}
    assert by_id["country_capital/Bolivia"]["truth"]["capital"][0] == "Sucre"
    assert "La Paz" in by_id["country_capital/Bolivia"]["truth"]["capital"]
    assert by_id["element_year/Sodium"]["truth"] == {"discovery_year": ["1807"]}
    assert "element_year/Iron" not in by_id  # known since antiquity: no year to grade
    assert by_id["element_profile/Iron"]["truth"] == {"symbol": ["Fe"], "atomic_number": ["26"]}
    assert set(by_id["country_continent/Russia"]["truth"]["continent"]) == {"Europe", "Asia"}


def test_pools_leave_out_ungradable_entities():
    cities = {e.name for e in entities_for(TYPES["city_country"])}
    assert len(cities) > 20_000  # thousands of entities
    assert "Singapore" not in cities and "Djibouti" not in cities  # named like their country
    countries = {e.name for e in entities_for(TYPES["country_capital"])}
    assert "Luxembourg" not in countries and "France" in countries
