"""Annotated conversations (a year right or wrong by parity, a city always right) for the probe's tests."""

from __future__ import annotations

import random


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        year, city = rng.randint(1900, 1999), rng.choice(["Oslo", "Lund", "Turku"])
        answer = f"Person {i} was born in {year} in {city}."
        out.append({"conversation": [{"role": "user", "content": f"Tell me about person {i}."},
                                     {"role": "assistant", "content": answer}],
                    "annotations": [{"span": str(year), "label": "Not Supported" if year % 2 else "Supported"},
                                    {"span": city, "label": "Supported"}]})
    return out
