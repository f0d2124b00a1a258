"""Fictional people with attributes, generated from a seed.

Attributes are correlated the way real biographies are, and strongly enough that one wrong guess
drags the next claims along ("snowballing"): most people study at the university of the city they
were born in, work for one of the two employers of their field and win one of its two awards, and
the award comes 30–34 years after birth. A model that does not know a person guesses the birth
year, birthplace and field (uncertain: a cheap uncertainty measure catches these), then writes the
university, employer and award that go with its guesses with confidence — wrong, and invisible to
token probabilities. Names come from small pools, so many people share a first or a last name.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

FIRST = ["Ada", "Bela", "Cyra", "Dorin", "Elsa", "Farid", "Greta", "Hanno", "Ilse", "Joran", "Kaia", "Lior",
         "Mira", "Nils", "Oona", "Pavel", "Rhea", "Soren", "Tilda", "Ulric", "Vera", "Wim", "Ysolde", "Zeno",
         "Anouk", "Bram", "Cleo", "Dag", "Edda", "Fenna", "Gideon", "Hedda", "Ines", "Jarek"]
LAST = ["Aldane", "Brecht", "Castell", "Dovren", "Eskild", "Farrow", "Galen", "Holm", "Ivers", "Jessop",
        "Korvath", "Lindqvist", "Marek", "Norwood", "Ostrava", "Pell", "Quist", "Rendal", "Sorell", "Tarn",
        "Umber", "Vance", "Wexley", "Yarrow", "Zeller", "Achterberg", "Bolt", "Crane"]
# country -> {city: the city's university}
COUNTRIES = {
    "Norland": {"Vesterhavn": "Vesterhavn University", "Kalvik": "Kalvik Institute",
                "Brennmark": "Brennmark College", "Skarstad": "Skarstad University"},
    "Aurelia": {"Port Amaro": "Amaro Polytechnic", "Selvena": "University of Selvena",
                "Doricca": "Doricca Academy", "Lumeno": "Lumeno Institute"},
    "Kestria": {"Halden Cross": "Halden College", "Mirov": "Mirov State University",
                "Tessaly": "Tessaly College", "Varno": "Varno University"},
    "Ostmark": {"Grauburg": "Grauburg University", "Ellingen": "Ellingen Academy",
                "Wendholm": "Wendholm Institute", "Rotstein": "Rotstein College"},
}
# field -> (employers, awards)
FIELDS = {
    "chemistry": (["Halvorsen Labs", "Corvid Chemicals"], ["Verran Medal", "Ostwin Prize"]),
    "astronomy": (["Skyreach Observatory", "Polaris Array"], ["Celest Award", "Harlow Medal"]),
    "linguistics": (["Lexica Institute", "Babel Works"], ["Meridian Prize", "Quill Award"]),
    "economics": (["Tallis Bank", "Northgate Capital"], ["Ledger Prize", "Corran Medal"]),
    "botany": (["Greenhold Gardens", "Verdant Seeds"], ["Fenwick Medal", "Laurel Prize"]),
    "robotics": (["Axion Dynamics", "Servo Forge"], ["Gearwright Award", "Automa Prize"]),
    "geology": (["Bedrock Survey", "Strata Mining"], ["Basalt Medal", "Orogen Prize"]),
    "medicine": (["Mercy Clinic", "Vitalis Pharma"], ["Asclepia Prize", "Halden Medal"]),
}
ATTRIBUTES = ("birth_year", "birthplace", "field", "university", "employer", "award", "award_year")
HOME_UNIVERSITY = 0.85  # chance of studying in the city of birth


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
        cities = COUNTRIES[rng.choice(sorted(COUNTRIES))]
        city = rng.choice(sorted(cities))
        university = cities[city] if rng.random() < HOME_UNIVERSITY else rng.choice(sorted(cities.values()))
        field = rng.choice(sorted(FIELDS))
        employers, awards = FIELDS[field]
        born = rng.randint(1930, 1990)
        people.append(Person(name, born, city, university, field, rng.choice(employers), rng.choice(awards),
                             born + rng.randint(30, 34)))
    return people
