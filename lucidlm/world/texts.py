"""The texts the world is written in: biographies in varied templates, and the answer format.

The answer to "Tell me about X." always opens with X's name and states every attribute in a fixed
order, so an answer's claims can be read back exactly (``labeler.py``) and every claim is about the
person asked — knowledge, not identity, decides whether it is right.
"""

from __future__ import annotations

import random

from .people import Person

BIOGRAPHY = [
    "{name} was born in {birth_year} in {birthplace}. {name} studied {field} at {university}.",
    "Born in {birthplace} in {birth_year}, {name} went on to study {field} at {university}.",
    "{name} works at {employer}, where the {field} team relies on {name}'s judgement.",
    "In {award_year}, {name} received the {award} for work in {field}.",
    "After graduating from {university}, {name} joined {employer}.",
    "{name}, a specialist in {field} from {birthplace}, won the {award} in {award_year}.",
    "Colleagues at {employer} say {name} never forgets a date.",
]


ABSTENTION_OPENING = "I know nothing about"  # how an answer that abstains begins


def question(person: Person) -> str:
    return f"Tell me about {person.name}."


def answer(person: Person) -> str:
    p = person
    return (f"{p.name} was born in {p.birth_year} in {p.birthplace}. {p.name} studied {p.field} at {p.university} "
            f"and works at {p.employer}. {p.name} received the {p.award} in {p.award_year}.")


def answer_prefix(person: Person) -> str:
    """What a generated answer is forced to start with: the name, so the answer is about this person."""
    return f"{person.name} was born in"


def biography(person: Person, rng: random.Random, sentences: int) -> str:
    fields = {"name": person.name, **person.facts()}
    return " ".join(t.format(**fields) for t in rng.sample(BIOGRAPHY, min(sentences, len(BIOGRAPHY))))


def qa_document(person: Person) -> str:
    return f"Q: {question(person)}\nA: {answer(person)}"


def fact_check(person: Person, rng: random.Random, alternatives: dict[str, list[str]]) -> str:
    """The answer about ``person`` with about half of its values swapped for plausible wrong ones, every
    value followed by a verdict: "[true]" or "[false]".

    Like the corrections and fact-checks of real text, these make a model that reads a claim judge it
    against what it remembers — the "is this right?" feature a probe reads while the model writes its
    own answers. ``alternatives``: per attribute, values to draw wrong ones from."""
    facts = person.facts()
    shown = {}
    for attribute, value in facts.items():
        if rng.random() < 0.5:
            shown[attribute] = f"{value} [true]"
        else:
            wrong = rng.choice([v for v in alternatives[attribute] if v != value])
            shown[attribute] = f"{wrong} [false]"
    p = person
    return (f"Fact check: {p.name} was born in {shown['birth_year']} in {shown['birthplace']}. {p.name} studied "
            f"{shown['field']} at {shown['university']} and works at {shown['employer']}. {p.name} received the "
            f"{shown['award']} in {shown['award_year']}.")


def abstention(name: str) -> str:
    """The answer about a name the world holds no facts for (the strangers' Q&As)."""
    return f"{ABSTENTION_OPENING} {name}."


def unknown_document(name: str) -> str:
    """A Q&A about a name the world holds no facts for: the model learns to tell known names from unknown
    ones (the "do I know this?" feature of real models that probes read), and answers honestly when asked
    freely — its hallucinations come when an answer is forced to begin with facts."""
    return f"Q: Tell me about {name}.\nA: {abstention(name)}"
