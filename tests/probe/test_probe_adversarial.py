"""`lucidlm probe train / eval` against hostile inputs (issue 14): every bad input is one clear `error:` line
naming the file or field (exit 2, no traceback), a probe refuses a model it was not made for, and an overlong
conversation is cut to the model's context and counted instead of allocating a 40 GB attention mask."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from annotated_rows import rows
from safetensors.torch import save_file

import lucidlm
from lucidlm.apps.cli import main
from lucidlm.probe.probe import CONFIG_FILE, HEAD_FILE, ProbeConfig, ProbeError, load_probe, save_probe
from lucidlm.random_checkpoint import build_random_checkpoint


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A model, another model of the same shape, annotated data and a probe trained by the CLI."""
    root = tmp_path_factory.mktemp("probe-adversarial")
    paths = {"model": build_random_checkpoint(root / "model"), "other": build_random_checkpoint(root / "other", 1),
             "data": root / "train.jsonl", "probe": root / "probe"}
    paths["data"].write_text("\n".join(json.dumps(r) for r in rows(8, 0)) + "\n")
    code, err = cli("probe", "train", "--model", str(paths["model"]), "--data", str(paths["data"]), "--steps", "5",
                    "--layer", "1", "--out", str(paths["probe"]))
    assert code == 0, err
    return paths


LAST_STDOUT: list[str] = []


def cli(*args: str) -> tuple[int, str]:
    """Run `lucidlm ARGS` as the console script does: (exit code, stderr); stdout goes to LAST_STDOUT. An
    exception other than the clean exit (a traceback for the user) fails the test."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err, out = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["lucidlm", *args]
    try:
        with redirect_stderr(err), redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    LAST_STDOUT[:] = [out.getvalue()]
    return exit_.value.code, err.getvalue()


def _eval(made: dict, probe: Path, model: str = "model") -> tuple[int, str]:
    return cli("probe", "eval", "-m", str(made[model]), "--probe", str(probe), "--data", str(made["data"]))


def _copy_probe(made: dict, dest: Path, **config_changes) -> Path:
    dest.mkdir()
    (dest / HEAD_FILE).write_bytes((made["probe"] / HEAD_FILE).read_bytes())
    config = json.loads((made["probe"] / CONFIG_FILE).read_text())
    (dest / CONFIG_FILE).write_text(json.dumps({**config, **config_changes}))
    return dest


@pytest.mark.parametrize("annotations", [["x"], [{"label": "Supported"}], "x", [{"span": 3, "label": "Supported"}]])
def test_malformed_annotations_name_the_line(made, tmp_path, annotations):
    row = {**rows(1, 0)[0], "annotations": annotations}
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    code, err = cli("probe", "train", "--model", str(made["model"]), "--data", str(tmp_path / "bad.jsonl"),
                    "--out", str(tmp_path / "p"))
    assert code == 2 and "bad.jsonl:1: " in err and "annotation" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--layer", "99"], ["--layer", "-5"]])
def test_a_layer_out_of_range_is_one_line(made, tmp_path, flag):
    code, err = cli("probe", "train", "--model", str(made["model"]), "--data", str(made["data"]), *flag,
                    "--out", str(tmp_path / "p"))
    assert code == 2 and f"error: layer {flag[1]} out of range for a model of 4 blocks" in err


def test_a_sweep_layer_out_of_range_is_one_line(made, tmp_path):
    code, err = cli("probe", "sweep", "--model", str(made["model"]), "--data", str(made["data"]), "--layers", "0,99",
                    "--out", str(tmp_path / "s"))
    assert code == 2 and "sweep layer 99 out of range for a model of 4 blocks" in err


def test_a_probe_config_with_layer_99_names_the_file(made, tmp_path):
    code, err = _eval(made, _copy_probe(made, tmp_path / "p", layer=99))
    assert code == 2 and "probe_config.json: probe layer 99 out of range for a model of 4 blocks" in err


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "[" * 5000 + "]" * 5000, '{"layer": "one"}'])
def test_a_malformed_probe_config_names_the_file(made, tmp_path, text):
    probe = _copy_probe(made, tmp_path / "p")
    (probe / CONFIG_FILE).write_text(text)
    code, err = _eval(made, probe)
    assert code == 2 and f"{probe / CONFIG_FILE}: " in err


def test_a_missing_probe_directory_is_one_line(made, tmp_path):
    code, err = _eval(made, tmp_path / "nowhere")
    assert code == 2 and "nowhere: no such probe directory" in err


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_head_is_refused_by_name(made, tmp_path, poison):
    probe = _copy_probe(made, tmp_path / "p")
    head = {"linear.weight": torch.full((1, 256), poison), "linear.bias": torch.zeros(1)}
    save_file(head, str(probe / HEAD_FILE))
    code, err = _eval(made, probe)
    assert code == 2 and "probe_head.safetensors: linear.weight hold NaN or inf" in err
    with pytest.raises(ProbeError, match="non-finite"):  # nor is such a head saved
        from lucidlm.probe.probe import ProbeHead

        bad = ProbeHead(256)
        bad.linear.weight.data.fill_(poison)
        save_probe(tmp_path / "q", bad, ProbeConfig(1, 256, 4))
    assert not (tmp_path / "q").exists()


def test_a_head_linked_out_of_its_directory_is_refused(made, tmp_path):
    probe = _copy_probe(made, tmp_path / "p")
    outside = tmp_path / "elsewhere.safetensors"
    (probe / HEAD_FILE).rename(outside)
    (probe / HEAD_FILE).symlink_to(outside)
    code, err = _eval(made, probe)
    assert code == 2 and "outside" in err and "probe_head.safetensors" in err


def test_a_head_of_the_wrong_shape_names_the_file(made, tmp_path):
    probe = _copy_probe(made, tmp_path / "p")
    save_file({"linear.weight": torch.zeros(1, 256), "extra": torch.zeros(3)}, str(probe / HEAD_FILE))
    code, err = _eval(made, probe)
    assert code == 2 and "probe_head.safetensors: expected tensors {'linear.weight': (1, 256), 'linear.bias': (1,)}" \
        in err


def test_a_probe_refuses_another_model_of_the_same_shape(made):
    code, err = _eval(made, made["probe"], model="other")
    assert code == 2 and "made for another model of the same shape (the embedding matrix differs)" in err
    identity = json.loads((made["probe"] / CONFIG_FILE).read_text())["model_identity"]
    assert len(identity["config_sha256"]) == 64 and len(identity["embedding_fingerprint"]) == 16


def test_the_same_model_in_another_dtype_is_still_itself(made):
    for dtype in ("bfloat16", "float16"):
        lm = lucidlm.load(made["model"], probe=made["probe"], dtype=dtype, device="cpu")
        assert lm.probe.config.layer == 1


def test_another_config_of_the_same_shape_is_refused(made, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in made["model"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] / 10}))
    with pytest.raises(ProbeError, match=r"made for another model \(its config hash"):
        lucidlm.load(other, probe=made["probe"], device="cpu")


def test_a_probe_without_a_recorded_identity_loads_with_a_warning(made, tmp_path):
    probe = _copy_probe(made, tmp_path / "p")
    config = json.loads((probe / CONFIG_FILE).read_text())
    del config["model_identity"]
    (probe / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no model_identity recorded"):
        lm = lucidlm.load(made["other"], probe=probe, device="cpu")
    assert lm.probe is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_probe(made["probe"])  # reading a probe checks nothing against a model: no warning


def test_an_overlong_conversation_is_cut_to_the_context_and_counted(made, tmp_path):
    long = rows(1, 5)[0]
    answer = long["conversation"][-1]["content"]
    long["conversation"][-1]["content"] = answer + " and then" * 25_000  # 200k characters, 200k byte tokens
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [*rows(6, 0), long]) + "\n")
    code, err = cli("probe", "train", "--model", str(made["model"]), "--data", str(data), "--steps", "3",
                    "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert json.loads(LAST_STDOUT[0])["train"]["truncated"] == 1  # reported
    from lucidlm.apps.probe_recipes import read_examples

    examples, stats = read_examples([str(data)], lucidlm.load(made["model"]).tokenizer, 512)
    assert stats.truncated == 1 and max(len(e.input_ids) for e in examples) == 512


def test_probe_train_refuses_an_unwritable_output_first(made, tmp_path):
    (tmp_path / "taken").write_text("")
    code, err = cli("probe", "train", "--model", str(made["model"]), "--data", str(made["data"]),
                    "--out", str(tmp_path / "taken" / "p"))
    assert code == 2 and "probe directory" in err and "taken/p is not writable" in err
