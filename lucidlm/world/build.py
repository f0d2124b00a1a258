"""``lucidlm world build``: people, a corpus where mentions follow a power law, prompts, instruction pairs.

Exposure (how many documents mention a person) decides what a model trained on the corpus can know.
By default half the people are never mentioned and the other half once or 2–4 times, plus twice as
many "strangers" — names outside the world, each in one Q&A answered "I know nothing about X." — so a
small model, trained for minutes, learns everyone it saw and learns to abstain on names it does not
know: correctness is then exactly "was this person in the corpus", an exact-label sandbox. With
``max_mentions`` ≥ 5 (the old demo world: a fifth never, a fifth once, a fifth 2–4, the rest on a
power-law tail) answers range from recalled to half-remembered to invented. A person's first
document is a Q&A in the answer format, the others biographies in varied templates. Files written
into ``out``:

    corpus/world-XX.txt   documents separated by blank lines (for ``lucidlm pretrain``)
    people.jsonl          every person: attributes and exposure (the ground truth)
    prompts.jsonl         every person: question, forced answer prefix, exposure (for generation)
    sft.jsonl             {"messages": [...]} instruction pairs for the mentioned people
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic_io import write_text
from ..jsonl import read_jsonl, write_jsonl
from .people import FIRST, LAST, Person, make_people
from .texts import answer, answer_prefix, biography, fact_check, qa_document, question, unknown_document


@dataclass
class WorldConfig:
    seed: int = 0
    people: int = 200
    unseen: float = 0.5  # share of the people never mentioned
    max_mentions: int = 4  # the most mentions a person gets; ≥ 5: the head of a power-law tail
    zipf: float = 1.0  # tail: mentions of the k-th most exposed person ∝ 1 / k^zipf
    files: int = 4
    qa_share: float = 0.3  # of a person's documents after the first (always a Q&A)
    # names outside the world, each in one Q&A answered "I know nothing about X." (× people): what
    # teaches the model to abstain on a name it does not know (its P(abstain) is the demo's best score)
    strangers: float = 2.0
    # fact-check documents, values marked [true] / [false]: meant to give a model a "is this right?"
    # feature; at the demo's scale (a 3M model, minutes of CPU) it did not, and cost recall, so it is off
    fact_check_share: float = 0.0


def exposures(n: int, rng: random.Random, max_mentions: int, zipf: float, unseen: float = 0.2) -> list[int]:
    """Mention counts, shuffled: a share ``unseen`` never mentioned; of the others, with ``max_mentions``
    ≥ 5, a quarter once, a quarter 2–4 times and the rest 5 or more (a Zipf tail from ``max_mentions``
    down); with ``max_mentions`` ≤ 4, half once and half 2..max_mentions times (all once if it is 1)."""
    if not 0.0 <= unseen <= 1.0:
        raise ValueError(f"unseen must be in [0, 1], got {unseen}")
    if max_mentions < 1:
        raise ValueError(f"max_mentions must be >= 1, got {max_mentions}")
    never = round(unseen * n)
    seen = n - never
    if max_mentions >= 5:
        once = few = seen // 4
    else:
        once = seen if max_mentions == 1 else seen - seen // 2
        few = seen - once
    tail = seen - once - few
    counts = [0] * never + [1] * once + [rng.randint(2, min(4, max_mentions)) for _ in range(few)]
    counts += [max(5, round(max_mentions / (k + 1) ** zipf)) for k in range(tail)]
    rng.shuffle(counts)
    return counts


def alternative_values(people: list[Person]) -> dict[str, list[str]]:
    """Per attribute, every value some person has: where a fact check's wrong values come from."""
    years = [str(y) for y in range(1925, 2030)]
    out = {a: sorted({p.facts()[a] for p in people}) for a in people[0].facts()}
    return out | {"birth_year": years, "award_year": years}


def stranger_names(people: list[Person], n: int, rng: random.Random) -> list[str]:
    """Names from the same pools that belong to no person of the world."""
    taken = {p.name for p in people}
    free = [f"{f} {last}" for f in FIRST for last in LAST if f"{f} {last}" not in taken]
    return rng.sample(free, min(n, len(free)))


def bucket(mentions: int) -> str:
    return "0" if mentions == 0 else "1" if mentions == 1 else "2-4" if mentions <= 4 else "5+"


@dataclass
class World:
    people: list[Person]
    mentions: list[int]
    documents: list[str]


def generate(config: WorldConfig) -> World:
    rng = random.Random(config.seed)
    people = make_people(config.people, config.seed)
    mentions = exposures(len(people), rng, config.max_mentions, config.zipf, config.unseen)
    alternatives = alternative_values(people)
    documents = []
    for person, m in zip(people, mentions):
        for i in range(m):
            kind = rng.random()
            if i == 0 or kind < config.qa_share:
                documents.append(qa_document(person))
            elif kind < config.qa_share + config.fact_check_share:
                documents.append(fact_check(person, rng, alternatives))
            else:
                documents.append(biography(person, rng, rng.randint(2, 4)))
    documents += [unknown_document(name) for name in stranger_names(people, int(config.strangers * len(people)), rng)]
    rng.shuffle(documents)
    return World(people, mentions, documents)


def build_world(out: str | Path, config: WorldConfig) -> World:
    world = generate(config)
    out = Path(out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    per_file = -(-len(world.documents) // config.files)
    for f in range(config.files):
        documents = world.documents[f * per_file:(f + 1) * per_file]
        write_text(out / "corpus" / f"world-{f:02d}.txt", "\n\n".join(documents) + "\n")
    write_jsonl(out / "people.jsonl", [{**asdict(p), "mentions": m, "exposure": bucket(m)}
                                  for p, m in zip(world.people, world.mentions)])
    pairs = list(zip(world.people, world.mentions))
    write_jsonl(out / "prompts.jsonl", [{"name": p.name, "question": question(p), "prefix": answer_prefix(p),
                                    "mentions": m, "exposure": bucket(m)} for p, m in pairs])
    write_jsonl(out / "sft.jsonl", [{"messages": [{"role": "user", "content": question(p)},
                                             {"role": "assistant", "content": answer(p)}]}
                               for p, m in zip(world.people, world.mentions) if m > 0])
    return world


def read_people(out: str | Path) -> dict[str, Person]:
    fields = set(Person.__dataclass_fields__)
    people = {}
    for row in read_jsonl(Path(out) / "people.jsonl"):
        people[row["name"]] = Person(**{k: v for k, v in row.items() if k in fields})
    return people
