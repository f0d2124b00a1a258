"""A small English corpus the project generates itself, for pretraining runs that need no download.

Documents describe a made-up town: people with jobs, ages, homes and habits, written from a few
dozen sentence templates with seeded random choices. It has the statistics a language model can
learn in minutes on a CPU (frequent words, agreement, facts repeated across documents) while being
reproducible from a seed and of any size.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..atomic_io import write_text

FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo",
         "Maya", "Nico", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor"]
LAST = ["Berg", "Costa", "Dunn", "Evans", "Fischer", "Grant", "Hale", "Ito", "Jansen", "Klein"]
JOBS = ["baker", "teacher", "doctor", "farmer", "painter", "carpenter", "nurse", "librarian", "fisher", "engineer"]
PLACES = ["the old mill", "the harbour", "the market square", "the hill road", "the river bank", "the north gate"]
THINGS = ["bread", "books", "apples", "fish", "tools", "letters", "paintings", "flowers"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEMPLATES = [
    "{name} is a {job} who lives near {place}.",
    "Every {day}, {name} walks to {place} to buy {thing}.",
    "{name} is {age} years old and has worked as a {job} for {years} years.",
    "When it rains, {name} stays home and sorts the {thing}.",
    "{name} and {other} met at {place} on a {day} morning.",
    "The {job} {name} says that good {thing} take time.",
    "On {day}s the square is full, and {name} sells {thing} until noon.",
    "{other} asked {name} for help, and {name} came the same day.",
]


def person(rng: random.Random, name: str) -> dict:
    age = rng.randint(20, 80)
    return {"name": name, "job": rng.choice(JOBS),
            "place": rng.choice(PLACES), "age": age, "years": rng.randint(1, age - 18)}


def document(rng: random.Random, people: list[dict], sentences: int) -> str:
    who = rng.choice(people)
    lines = []
    for _ in range(sentences):
        other = rng.choice([p for p in people if p["name"] != who["name"]])
        fields = dict(who, day=rng.choice(DAYS), thing=rng.choice(THINGS), other=other["name"])
        lines.append(rng.choice(TEMPLATES).format(**fields))
    return " ".join(lines)


def write_corpus(out_dir: str | Path, documents: int = 2000, files: int = 4, seed: int = 0,
                 population: int = 60) -> list[Path]:
    """``files`` text files of blank-line-separated documents; the same seed gives the same corpus."""
    if documents < 1 or files < 1:
        raise ValueError(f"need documents >= 1 and files >= 1, got {documents} and {files}")
    rng = random.Random(seed)
    if not 2 <= population <= len(FIRST) * len(LAST):
        raise ValueError(f"population must be in [2, {len(FIRST) * len(LAST)}], got {population}")
    names = rng.sample([f"{first} {last}" for first in FIRST for last in LAST], population)  # unique people
    people = [person(rng, name) for name in names]  # facts stay fixed across documents
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        docs = [document(rng, people, rng.randint(3, 8)) for _ in range(documents // files)]
        path = out / f"town-{f:02d}.txt"
        write_text(path, "\n\n".join(docs) + "\n")
        paths.append(path)
    return paths
