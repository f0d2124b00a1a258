"""``lucidlm rl-eval``'s measurement: greedy + sampled answers from the engine, each graded as the verifiable reward
grades it, the metrics those rows give, "known" taken from the base model's rows; and the prompts it reads."""

from __future__ import annotations

import json

import pytest
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from lucidlm.apps.cli import app
from lucidlm.apps.rl_eval import compare, evaluate, grading_for, metrics_table, rows_metrics
from lucidlm.apps.rl_metrics import hallucination_metrics, knowledge_sets, world_unknowable
from lucidlm.apps.rl_prompts import world_rl_prompts
from lucidlm.jsonl import read_json, write_json
from lucidlm.train.rewards import RLPrompt
from lucidlm.world.build import WorldConfig, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(seed=0, people=10))
    return out


def text_prompts(world) -> list[RLPrompt]:  # the byte tokenizer has no chat template: the question as text
    return [RLPrompt(text=p.messages[0]["content"] + "\nA:", meta=p.meta) for p in world_rl_prompts(world, "all")]


def test_rows_are_the_engines_answers_graded_and_the_metrics_theirs(world, tmp_path):
    lm = tiny_lm()
    prompts = text_prompts(world)
    rows, metrics = evaluate(lm, prompts, f"world:{world}", samples=2, max_new_tokens=6)
    assert [r["kind"] for r in rows] == ["greedy"] * len(prompts) + ["sample"] * 2 * len(prompts)
    greedy = lm.generate([p.text for p in prompts], max_new_tokens=6)
    grading, unknowable = grading_for(f"world:{world}")
    for row, prompt, completion in zip(rows, prompts, greedy):
        answer, notes = grading.grade(prompt.meta, completion.text)
        assert (row["id"], row["answer"], row["annotations"]) == (prompt.meta["name"], answer, notes)
    assert unknowable == world_unknowable(world)
    known = knowledge_sets([r for r in rows if r["knowable"]])["known"]
    assert json.dumps(metrics) == json.dumps(hallucination_metrics(rows, unknowable, known))  # NaN != NaN

    before = tmp_path / "before.json"  # "known" from the base model's rows, whatever the rows at hand say
    write_json(before, [r | {"annotations": [{"label": "Supported"}]} for r in rows])
    _, after = evaluate(lm, prompts, f"world:{world}", samples=2, max_new_tokens=6, known_from=before)
    knowable = {r["id"] for r in rows if r["knowable"]}
    assert after["abstention_known"]["entities"] == len(knowable)
    assert "| supported_rate |" in metrics_table({"before": metrics, "after": after})

    saved = tmp_path / "after.json"  # rl-compare: the same table from the saved rows
    write_json(saved, rows)
    assert compare([before, saved], f"world:{world}") == metrics_table({"before": rows_metrics(
        read_json(before), unknowable), "after": after})
    result = CliRunner().invoke(app, ["rl-compare", str(before), str(saved), "--grader", f"world:{world}"])
    assert result.exit_code == 0 and result.output.strip() == compare([before, saved], f"world:{world}")
    with pytest.raises(FileNotFoundError, match="rows files not found"):
        compare([tmp_path / "nope.json"], f"world:{world}")


def test_the_cli_writes_prompts_and_rows(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "eval.jsonl"
    result = runner.invoke(app, ["rl-prompts", "--world", str(world), "--split", "eval", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = [json.loads(line)["meta"]["name"] for line in out.read_text().splitlines()]
    assert names == [p.meta["name"] for p in world_rl_prompts(world, "eval")]
    result = runner.invoke(app, ["rl-prompts", "--world", str(world), "--split", "test", "--out", str(out)])
    assert "world split must be one of" in str(result.exception)


def test_bad_grader_and_settings_are_named_before_any_answer(world):
    lm = tiny_lm()
    with pytest.raises(ValueError, match="unknown grader 'probe'"):
        evaluate(lm, text_prompts(world), "probe")
    with pytest.raises(ValueError, match="world:DIR needs"):
        evaluate(lm, text_prompts(world), "world")
    with pytest.raises(ValueError, match="samples must be >= 0"):
        evaluate(lm, text_prompts(world), f"world:{world}", samples=-1)
