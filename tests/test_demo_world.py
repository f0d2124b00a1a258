"""The demo's stage cache: stages are reused while their settings hold and rebuilt (with every later
stage) when a setting changes; an interrupted stage is never taken as done."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console

from lucidlm.demo_world import (
    STAGES,
    DemoConfig,
    _stage_keys,
    build_tokenizer_stage,
    build_world_stage,
    split_people,
    world_cache,
)


def test_a_changed_setting_invalidates_its_stage_and_every_later_one():
    base = _stage_keys(DemoConfig())
    assert list(base) == list(STAGES)
    changed = _stage_keys(DemoConfig(lm_steps=7))
    assert [s for s in STAGES if base[s] != changed[s]] == ["lm", "answers", "probe"]
    assert _stage_keys(DemoConfig(seed=1))["world"] != base["world"]
    assert _stage_keys(DemoConfig(device="cpu")) == base  # where it runs does not change what is built


def test_cached_stages_are_reused_and_stale_ones_rebuilt(tmp_path):
    config = DemoConfig(people=30, vocab_size=300)
    cache = world_cache(tmp_path, config)
    world = build_world_stage(cache, config, Console())
    tokenizer = build_tokenizer_stage(cache, config, world)
    assert cache.fresh("world") and cache.fresh("tokenizer") and not cache.fresh("lm")
    stamp = (tokenizer / "tokenizer.json").stat().st_mtime_ns
    build_tokenizer_stage(cache, config, world)
    assert (tokenizer / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not retrained
    other = replace(config, vocab_size=320)
    cache2 = world_cache(tmp_path, other)
    assert cache2.fresh("world") and not cache2.fresh("tokenizer")
    build_tokenizer_stage(cache2, other, world)
    assert (tokenizer / "tokenizer.json").stat().st_mtime_ns != stamp
    (tmp_path / "world.done").unlink()  # as if killed while building: the stage is redone
    assert not cache.fresh("world")


def test_people_split_is_disjoint_and_seeded():
    names = [f"p{i}" for i in range(11)]
    a, b = split_people(names, 0)
    assert not a & b and a | b == set(names) and len(a) == 5
    assert split_people(names, 0) == (a, b) and split_people(names, 1) != (a, b)
