"""Splitting answers by entity, so a probe is tested on things it never saw in training.

``split_entities`` draws a seeded train / validation / test partition of the entities (a country's
capital, continent and profile answers all land on one side). The stricter value-disjoint view (test
claims whose value was never claimed in training) is a mask over claims: ``lucidlm.probe.claims.value_disjoint``.
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
