"""Entity splits: disjoint, covering, seeded, order-independent; the value-disjoint test subset."""

from __future__ import annotations

import random

import pytest

from lucidlm.facts.splits import rows_in, split_entities


def row(entity: str, *values: str, attribute: str = "capital") -> dict:
    return {"entity": entity, "type": "t",
            "annotations": [{"span": v, "label": "Supported", "index": 0, "attribute": attribute, "value": v}
                            for v in values]}


def test_split_is_disjoint_covering_deterministic_and_sized():
    rows = [row(f"e{i}") for i in range(200) for _ in range(2)]
    s = split_entities(rows, seed=1)
    assert set(s) == {"train", "validation", "test"}
    assert not (s["train"] & s["validation"]) and not (s["train"] & s["test"]) and not (s["validation"] & s["test"])
    assert s["train"] | s["validation"] | s["test"] == {f"e{i}" for i in range(200)}
    assert [len(s[k]) for k in ("train", "validation", "test")] == [100, 30, 70]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert split_entities(shuffled, seed=1) == s
    assert split_entities(rows, seed=2) != s
    assert len(rows_in(rows, s["test"])) == 140
    with pytest.raises(ValueError, match="fractions"):
        split_entities(rows, 0, (0.5, 0.5, 0.5))
