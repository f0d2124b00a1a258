"""`lucidlm probe train / eval / sweep` on annotated JSONL, as a user runs them."""

from __future__ import annotations

import json

from annotated_rows import rows
from typer.testing import CliRunner

from lucidlm.apps.cli import app
from lucidlm.random_checkpoint import build_random_checkpoint

runner = CliRunner()


def test_train_eval_sweep(tmp_path):
    model = build_random_checkpoint(tmp_path / "model")
    for name, seed in (("train", 0), ("test", 1)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(24, seed)) + "\n")
    common = ["--model", str(model), "--data", str(tmp_path / "train.jsonl"), "--steps", "10"]
    result = runner.invoke(app, ["probe", "train", *common, "--val-data", str(tmp_path / "test.jsonl"),
                                 "--layer", "2", "--out", str(tmp_path / "probe")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layer"] == 2 and report["train"]["missing_spans"] == 0
    assert set(report["eval"]["baselines"]) == {"nll", "entropy", "random_head"}
    result = runner.invoke(app, ["probe", "eval", "-m", str(model), "--probe", str(tmp_path / "probe"),
                                 "--data", str(tmp_path / "test.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["probe"]["span_max"]["auroc"] == report["eval"]["probe"]["span_max"]["auroc"]
    result = runner.invoke(app, ["probe", "sweep", *common, "--layers", "0,3", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["span_max_auroc_per_layer"]) == {"0", "3"}
    assert (tmp_path / "sweep" / "auroc_per_layer.png").exists()


def test_bad_rows_and_layers(tmp_path):
    model = build_random_checkpoint(tmp_path / "model")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"conversation": [], "annotations": []}) + "\n")
    result = runner.invoke(app, ["probe", "train", "--model", str(model), "--data", str(tmp_path / "bad.jsonl")])
    assert "bad.jsonl:1" in str(result.exception) and "must end with the assistant message" in str(result.exception)
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(r) for r in rows(4, 0)) + "\n")
    result = runner.invoke(app, ["probe", "train", "--model", str(model), "--data", str(tmp_path / "ok.jsonl"),
                                 "--layer", "9"])
    assert "layer 9 out of range for a model of 4 blocks" in str(result.exception)
