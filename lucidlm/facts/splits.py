"""Splitting answers by entity, so a probe is tested on things it never saw in training.

``split_entities`` draws a seeded train / validation / test partition of the entities (a country's
capital, continent and profile answers all land on one side). ``value_disjoint`` is stricter: it keeps
the test entities none of whose claimed values was ever claimed in training — a probe that learned
"the model says Paris when it is unsure" cannot score there by recognising the value.
"""

from __future__ import annotations

import random

SPLITS = ("train", "validation", "test")


def split_entities(rows: list[dict], seed: int, fractions: tuple[float, float, float] = (0.5, 0.15, 0.35),
                   ) -> dict[str, set]:
    """{"train", "validation", "test"}: disjoint entity sets covering every row's entity, the same for a seed
    whatever the rows' order."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    entities = sorted({r["entity"] for r in rows})
    random.Random(seed).shuffle(entities)
    n_train = round(fractions[0] * len(entities))
    n_val = round((fractions[0] + fractions[1]) * len(entities)) - n_train
    cuts = (entities[:n_train], entities[n_train:n_train + n_val], entities[n_train + n_val:])
    return {name: set(part) for name, part in zip(SPLITS, cuts)}


def rows_in(rows: list[dict], entities: set) -> list[dict]:
    return [r for r in rows if r["entity"] in entities]


def claimed_values(rows: list[dict]) -> set[tuple[str, str]]:
    """(attribute, normalised value) of every claim the rows make."""
    return {(a.get("attribute", ""), a["value"]) for r in rows for a in r["annotations"]}


def value_disjoint(train_rows: list[dict], test_rows: list[dict]) -> list[dict]:
    """The test rows of entities whose claimed values never appear among the training rows' claimed values."""
    seen = claimed_values(train_rows)
    tainted = {r["entity"] for r in test_rows for a in r["annotations"]
               if (a.get("attribute", ""), a["value"]) in seen}
    return [r for r in test_rows if r["entity"] not in tainted]
