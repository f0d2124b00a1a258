"""The demo's stage cache: stages are reused while their settings hold and rebuilt (with every later
stage) when a setting changes; an interrupted stage is never taken as done."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rich.console import Console

from lucidlm.apps.demo_world import (
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


def test_defaults_are_the_exact_label_sandbox():
    config = DemoConfig()
    assert (config.people, config.unseen, config.max_mentions, config.strangers) == (200, 0.5, 4, 2.0)
    assert (config.dim, config.lm_steps) == (128, 1500)
    base = _stage_keys(config)
    for field, value in (("unseen", 0.2), ("max_mentions", 24), ("strangers", 0.0)):
        assert _stage_keys(replace(config, **{field: value}))["world"] != base["world"]


def test_evaluation_gives_every_claim_its_answers_abstention_score(tmp_path):
    import json

    from tiny_lm import tiny_lm

    from lucidlm.apps.demo_world import QA_TEMPLATE, evaluation, metrics_table
    from lucidlm.probe.probe import LoadedProbe, ProbeConfig, ProbeHead
    from lucidlm.world.abstention import abstention_scores
    from lucidlm.world.answers import answer_row
    from lucidlm.world.build import WorldConfig, build_world, read_people
    from lucidlm.world.texts import answer

    build_world(tmp_path / "w", WorldConfig(seed=2, people=6))
    people = read_people(tmp_path / "w")
    prompts = [json.loads(line) for line in (tmp_path / "w" / "prompts.jsonl").read_text().splitlines()]
    lm = tiny_lm(seed=1)
    lm.tokenizer.chat_template = QA_TEMPLATE
    lm.probe = LoadedProbe(ProbeHead(lm.config.dim).eval(), ProbeConfig(1, lm.config.dim, lm.config.n_layers))
    rows = []
    for i, p in enumerate(prompts):  # true answers, and wrong ones for every other person
        rest = answer(people[p["name"]]).removeprefix(p["prefix"])
        rows.append(answer_row(p, people[p["name"]], rest if i % 2 else " 1801 in Nowhere.", 0))
    result, arrays = evaluation(lm, rows, tmp_path)
    assert list(result["baselines"]) == ["nll", "entropy", "abstention", "random_head"]
    assert set(arrays) == {"probe", "nll", "entropy", "abstention", "random_head"}
    scores = abstention_scores(lm, [p["question"] for p in prompts])
    expected = [scores[r["conversation"][0]["content"]] for r in rows for _ in r["annotations"]]
    values, labels = arrays["abstention"]
    assert values.tolist() == pytest.approx(expected, rel=1e-5)
    assert labels.tolist() == [int(a["label"] != "Supported") for r in rows for a in r["annotations"]]
    assert 0.0 <= result["baselines"]["abstention"]["span_max"]["auroc"] <= 1.0
    assert (tmp_path / "roc.png").exists()
    rendered = Console(width=200, record=True)
    rendered.print(metrics_table(result))
    assert "P(abstain) on the question" in rendered.export_text()


def test_the_world_options_reach_its_config_and_are_refused_without_world(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from lucidlm.apps import demo_world
    from lucidlm.apps.cli import app

    seen = []
    monkeypatch.setattr(demo_world, "run_demo", lambda out, config: seen.append((out, config)))
    result = CliRunner().invoke(app, ["demo", "--world", "--people", "40", "--unseen", "0.8", "--lm-steps", "9",
                                      "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    (out, config), = seen
    assert out == tmp_path / "w" and (config.people, config.unseen, config.lm_steps) == (40, 0.8, 9)
    refused = CliRunner().invoke(app, ["demo", "--unseen", "0.8", "--people", "40"])
    assert refused.exit_code != 0 and "only with --world" in refused.output and "--unseen" in refused.output
    out_of_range = CliRunner().invoke(app, ["demo", "--world", "--unseen", "1.5"])
    assert out_of_range.exit_code != 0 and not seen[1:]
