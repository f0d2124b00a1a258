"""The real-model demo's stage cache and entity split (the stages themselves run in `lucidlm demo`)."""

from __future__ import annotations

from dataclasses import replace

from lucidlm.demo import DemoConfig, _stage_keys, split_entities


def test_a_changed_setting_invalidates_its_stage_and_every_later_one():
    base = _stage_keys(DemoConfig())
    assert list(base) == ["model", "questions", "answers", "probe"]
    changed = _stage_keys(DemoConfig(samples=5))
    assert [s for s in base if base[s] != changed[s]] == ["answers", "probe"]
    assert _stage_keys(DemoConfig(seed=1))["model"] == base["model"]
    assert _stage_keys(DemoConfig(seed=1))["questions"] != base["questions"]
    assert _stage_keys(replace(DemoConfig(), layers=(1, 2)))["answers"] == base["answers"]
    assert _stage_keys(DemoConfig(device="cpu")) == base  # where it runs does not change what is built


def test_entities_split_disjoint_per_type_deterministic_and_in_proportion():
    rows = [{"type": t, "entity": f"{t}{i}"} for t in ("a", "b") for i in range(40) for _ in range(3)]
    splits = split_entities(rows, 0, (0.5, 0.15, 0.35))
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert splits["train"] | splits["val"] | splits["test"] == {(r["type"], r["entity"]) for r in rows}
    assert [len(splits[k]) for k in ("train", "val", "test")] == [40, 12, 28]  # 20/6/14 of each type
    assert split_entities(rows, 0, (0.5, 0.15, 0.35)) == splits
    assert split_entities(rows, 1, (0.5, 0.15, 0.35))["test"] != splits["test"]
