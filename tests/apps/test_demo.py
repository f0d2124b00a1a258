"""The real-model demo's stage cache (the stages themselves run in `lucidlm demo`; the entity split is tested in
tests/facts)."""

from __future__ import annotations

from dataclasses import replace

from lucidlm.apps.demo import DemoConfig, _stage_keys


def test_a_changed_setting_invalidates_its_stage_and_every_later_one():
    base = _stage_keys(DemoConfig())
    assert list(base) == ["model", "questions", "answers", "probe"]
    changed = _stage_keys(DemoConfig(samples=5))
    assert _stage_keys(DemoConfig(scale=2))["questions"] != base["questions"]
    assert [s for s in base if base[s] != changed[s]] == ["answers", "probe"]
    assert _stage_keys(DemoConfig(seed=1))["model"] == base["model"]
    assert _stage_keys(DemoConfig(seed=1))["questions"] != base["questions"]
    assert _stage_keys(replace(DemoConfig(), layers=(1, 2)))["answers"] == base["answers"]
    assert _stage_keys(DemoConfig(device="cpu")) == base  # where it runs does not change what is built
