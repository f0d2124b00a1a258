"""``lucidlm probe question`` and ``rl-eval --question-probe``: labels from the prompts' knowable flags, bad prompts
refused before the model loads, the CLI's probe directory, and each rl-eval row carrying its question's score (the
probe's own head on the question's state; out-of-fold for the questions it was fit on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from lucidlm.api import load
from lucidlm.apps import question_probe_recipe
from lucidlm.apps.cli import app
from lucidlm.apps.question_probe_recipe import knowable_labels, swept_layers, train_question_probe
from lucidlm.apps.rl_prompts import world_rl_prompts
from lucidlm.checkpoint import FAMILIES, save_model
from lucidlm.jsonl import write_jsonl
from lucidlm.probe.question_probe import load_question_probe, question_states
from lucidlm.random_checkpoint import CHAT_TEMPLATE
from lucidlm.tokenizer import pad_id
from lucidlm.train.rewards import RLPrompt
from lucidlm.train.rl_rollouts import encode_prompt, read_prompts
from lucidlm.world.build import WorldConfig, build_world

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(seed=0, people=24))
    return out


@pytest.fixture()
def checkpoint(tmp_path):
    lm = tiny_lm()
    save_model(lm.model, tmp_path / "m", FAMILIES["llama"])
    lm.tokenizer.save(tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tmp_path / "m"


def test_labels_are_the_prompts_knowable_flags_and_a_prompt_without_one_is_refused():
    prompts = [RLPrompt(text="a", meta={"id": "a", "knowable": True}),
               RLPrompt(text="b", meta={"id": "b", "knowable": False})]
    assert knowable_labels(prompts).tolist() == [0, 1]
    with pytest.raises(ValueError, match="knowable' \\(e.g. 'c'\\)"):
        knowable_labels(prompts + [RLPrompt(text="c", meta={"id": "c"})])


def test_swept_layers_default_across_the_depth_and_out_of_range_is_refused():
    assert swept_layers([], 30) == [6, 10, 15, 20, 24, 28]
    assert swept_layers([-1, 2, 2], 4) == [2, 3]
    with pytest.raises(ValueError, match=r"\[4\] out of range"):
        swept_layers([4], 4)


def test_bad_prompts_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "meta": {"id": "x"}}])
    monkeypatch.setattr("lucidlm.api.load", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(ValueError, match="knowable"):
        train_question_probe(tmp_path / "m", [tmp_path / "p.jsonl"], tmp_path / "q")


def test_the_cli_writes_a_probe_and_rl_eval_rows_carry_its_scores(world, checkpoint, tmp_path):
    runner = CliRunner()
    prompts = tmp_path / "p.jsonl"
    assert runner.invoke(app, ["rl-prompts", "--world", str(world), "--split", "all", "--out", str(prompts)]
                         ).exit_code == 0
    result = runner.invoke(app, ["probe", "question", "-m", str(checkpoint), "--prompts", str(prompts), "--out",
                                 str(tmp_path / "q"), "--layers", "0", "--layers", "1", "--folds", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    loaded = read_prompts([prompts])
    assert summary["questions"] == len(loaded) == 24
    assert summary["unknowable"] == int(knowable_labels(loaded).sum()) and set(summary["cv_auroc"]) == {"0", "1"}

    # rl-eval on the first 6 questions (trained on: out-of-fold scores) and the same questions renamed (new to it:
    # the head's own score of the question's state)
    renamed = [RLPrompt(messages=p.messages, meta=p.meta | {"id": p.meta["id"] + "?"}) for p in loaded[:6]]
    write_jsonl(tmp_path / "e.jsonl", [{"messages": list(p.messages), "meta": p.meta} for p in loaded[:6] + renamed])
    result = runner.invoke(app, ["rl-eval", "-m", str(checkpoint), "--prompts", str(tmp_path / "e.jsonl"),
                                 "--grader", f"world:{world}", "--samples", "1", "--max-new-tokens", "3",
                                 "--question-probe", str(tmp_path / "q"), "--out", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 24 and all("question_risk" in r for r in rows)
    lm = load(checkpoint, compile="off")
    probe = load_question_probe(tmp_path / "q", lm.model)
    ids = [encode_prompt(p, lm.tokenizer) for p in loaded[:6]]
    fresh = probe.head.scores(question_states(lm.model, ids, [probe.config.layer], pad_id(lm.tokenizer))[
        probe.config.layer]).tolist()
    by_id = {r["id"]: r["question_risk"] for r in rows}
    for p, score in zip(loaded[:6], fresh):
        assert by_id[p.meta["id"]] == pytest.approx(probe.out_of_fold[p.meta["id"]])
        assert by_id[p.meta["id"] + "?"] == pytest.approx(score, abs=1e-5)
    assert not np.allclose([by_id[p.meta["id"]] for p in loaded[:6]], fresh)  # the two are different numbers


def test_rl_eval_checks_the_question_probe_before_any_answer(world, tmp_path, monkeypatch):
    from lucidlm.apps import rl_eval

    monkeypatch.setattr(rl_eval, "sampled_rollouts", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(FileNotFoundError, match="no such probe directory"):
        rl_eval.evaluate(tiny_lm(), world_rl_prompts(world, "all"), f"world:{world}",
                         question_probe=tmp_path / "missing")
    assert question_probe_recipe.prompt_id(RLPrompt(text="x", meta={"name": "Ann"})) == "Ann"
