"""Fictional people with attributes, generated from a seed.

Attributes are correlated the way real biographies are (the birthplace's country decides the
university; the field decides the kind of employer and award; the birth year bounds the award
year), and names are drawn from small pools so that many people share a first or last name. Both
make errors plausible: a model that half-remembers a person produces a confident, well-formed,
wrong value — the hallucinations a probe must catch and cheap uncertainty measures miss.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

FIRST = ["Ada", "Bela", "Cyra", "Dorin", "Elsa", "Farid", "Greta", "Hanno", "Ilse", "Joran", "Kaia", "Lior",
         "Mira", "Nils", "Oona", "Pavel", "Rhea", "Soren", "Tilda", "Ulric", "Vera", "Wim", "Ysolde", "Zeno"]
LAST = ["Aldane", "Brecht", "Castell", "Dovren", "Eskild", "Farrow", "Galen", "Holm", "Ivers", "Jessop",
        "Korvath", "Lindqvist", "Marek", "Norwood", "Ostrava", "Pell", "Quist", "Rendal", "Sorell", "Tarn"]
COUNTRIES = {
    "Norland": (["Vesterhavn", "Kalvik", "Brennmark"], ["Vesterhavn University", "Kalvik Institute"]),
    "Aurelia": (["Port Amaro", "Selvena", "Doricca"], ["University of Selvena", "Amaro Polytechnic"]),
    "Kestria": (["Halden Cross", "Mirov", "Tessaly"], ["Mirov State University", "Tessaly College"]),
    "Ostmark": (["Grauburg", "Ellingen", "Wendholm"], ["Grauburg University", "Ellingen Academy"]),
}
FIELDS = {
    "chemistry": (["Halvorsen Labs", "Corvid Chemicals"], ["Verran Medal", "Ostwin Prize"]),
    "astronomy": (["Skyreach Observatory", "Polaris Array"], ["Celest Award", "Harlow Medal"]),
    "linguistics": (["Lexica Institute", "Babel Works"], ["Meridian Prize", "Quill Award"]),
    "economics": (["Tallis Bank", "Northgate Capital"], ["Ledger Prize", "Corran Medal"]),
    "botany": (["Greenhold Gardens", "Verdant Seeds"], ["Fenwick Medal", "Laurel Prize"]),
    "robotics": (["Axion Dynamics", "Servo Forge"], ["Gearwright Award", "Automa Prize"]),
}
ATTRIBUTES = ("birth_year", "birthplace", "university", "field", "employer", "award")


@dataclass(frozen=True)
class Person:
    name: str
    birth_year: int
    birthplace: str
    university: str
    field: str
    employer: str
    award: str
    award_year: int

    def facts(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k != "name"}


def make_people(n: int, seed: int) -> list[Person]:
    if not 1 <= n <= len(FIRST) * len(LAST):
        raise ValueError(f"the world holds 1 to {len(FIRST) * len(LAST)} people, got {n}")
    rng = random.Random(seed)
    names = rng.sample([f"{f} {last}" for f in FIRST for last in LAST], n)
    people = []
    for name in names:
        country = rng.choice(sorted(COUNTRIES))
        cities, universities = COUNTRIES[country]
        field = rng.choice(sorted(FIELDS))
        employers, awards = FIELDS[field]
        born = rng.randint(1930, 1990)
        people.append(Person(name, born, rng.choice(cities), rng.choice(universities), field, rng.choice(employers),
                             rng.choice(awards), born + rng.randint(30, 34)))
    return people
