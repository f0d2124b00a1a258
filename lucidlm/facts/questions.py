"""Question types over the data packages' entities, and a seeded draw of questions.

Each type asks one thing about one kind of entity (or, long-form, several things in one answer: the
setting of long-form hallucination detection, graded claim by claim). ``truth`` holds, per attribute,
the canonical values that count as right (a country with two capitals has two). A type keeps only
entities whose answer can be graded: a city named like a country, a country named like its capital
("Luxembourg"), an element known since antiquity (no discovery year) drop out of the types they break.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import sources
from .normalize import normalize


@dataclass(frozen=True)
class QuestionType:
    kind: str  # "city", "country", "element"
    template: str  # with {name}
    attributes: tuple[str, ...]
    max_new_tokens: int
    long_form: bool = False


TYPES = {
    "city_country": QuestionType("city", "What country is the city of {name} in?", ("country",), 32),
    "country_capital": QuestionType("country", "What is the capital of {name}?", ("capital",), 24),
    "country_continent": QuestionType("country", "Which continent is {name} in?", ("continent",), 24),
    "country_currency": QuestionType("country", "What is the official currency of {name}?", ("currency",), 24),
    "element_symbol": QuestionType("element", "What is the chemical symbol of the element {name}?", ("symbol",), 24),
    "element_number": QuestionType("element", "What is the atomic number of the element {name}?",
                                   ("atomic_number",), 24),
    "element_year": QuestionType("element", "In what year was the element {name} discovered?",
                                 ("discovery_year",), 32),
    "country_profile": QuestionType("country", "Tell me about the country {name}: its capital, continent and "
                                    "official currency.", ("capital", "continent", "currency"), 96, long_form=True),
    "element_profile": QuestionType("element", "Tell me about the chemical element {name}: its symbol, atomic "
                                    "number and when it was discovered.", ("symbol", "atomic_number",
                                                                          "discovery_year"), 96, long_form=True),
}
# Claim accuracy of SmolLM2-135M-Instruct, greedy (2026-12-01; 100 questions, long-form 60): city_country 33%,
# country_capital 42%, element_symbol 50%, element_profile 32%, country_profile 84% — the defaults, all within
# 15-85%. Left out: country_continent 95% (too easy), element_number 7%, element_year 3% (too hard: nearly
# every claim false), country_currency 32% (in range, but 40% of answers name invented currencies no lexicon holds).
DEFAULT_TYPES = ("city_country", "country_capital", "element_symbol", "element_profile", "country_profile")


def truth_of(entity: sources.Entity, attributes: tuple[str, ...]) -> dict[str, list[str]]:
    """{attribute: accepted canonical values}; attributes the source leaves empty are left out."""
    out = {}
    for a in attributes:
        value = entity.attributes.get(a, "")
        if not value:
            continue
        accepted = [value]
        if a == "capital":
            accepted += list(sources.EXTRA_CAPITALS.get(entity.key, ()))
        if a == "continent":
            accepted += [sources.continents()[c].name for c in sources.EXTRA_CONTINENTS.get(entity.key, ())]
        out[a] = accepted
    return out


def entities_for(qtype: QuestionType) -> list[sources.Entity]:
    """The type's gradable entities, sorted by name (the draw's order must not depend on dict order)."""
    pool = {"city": lambda: sources.cities().values(), "country": lambda: sources.countries().values(),
            "element": lambda: sources.elements().values()}[qtype.kind]()
    out = []
    for e in pool:
        truth = truth_of(e, qtype.attributes)
        if not qtype.long_form and len(truth) < len(qtype.attributes):
            continue  # e.g. no discovery year
        if e.kind == "country" and normalize(e.attributes["capital"]).startswith(normalize(e.name)):
            continue  # "Luxembourg": the capital's mention is the country's own name
        out.append(e)
    return sorted(out, key=lambda e: (e.name, e.key))


def question_of(type_name: str, entity: sources.Entity) -> dict:
    qtype = TYPES[type_name]
    return {"id": f"{type_name}/{entity.name}", "type": type_name, "entity": entity.name,
            "question": qtype.template.format(name=entity.name), "truth": truth_of(entity, qtype.attributes),
            "aliases": list(entity.aliases)}


def build_questions(seed: int, per_type: int | dict[str, int], types: tuple[str, ...] | list[str] = DEFAULT_TYPES,
                    ) -> list[dict]:
    """``per_type`` questions of each type (all its entities when fewer), distinct entities, the same for a seed."""
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; known: {list(TYPES)}")
    out = []
    for t in types:
        n = per_type.get(t, 0) if isinstance(per_type, dict) else per_type
        pool = entities_for(TYPES[t])
        chosen = random.Random(f"{seed}/{t}").sample(pool, min(n, len(pool)))
        out += [question_of(t, e) for e in chosen]
    return out
