"""The trainer against planted run directories and hostile data (issue 14): resuming never runs code from a
file, never reads outside ``checkpoints/``, checks the run before any tensor; every hostile SFT line is one bad
line; a read-only output directory fails before training starts."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from synthetic_data import ProgressionData
from test_trainer import config, tiny

from lucidlm.train.checkpointing import OutputDirError, latest_checkpoint
from lucidlm.train.state_io import StateError
from lucidlm.train.trainer import Trainer


class _Planted:
    """A pickle that touches a file when loaded: what a planted trainer_state.pt could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _trained(tmp_path: Path, **kw) -> Path:
    cfg = config(tmp_path, **{"max_steps": 4, "save_every": 2, "eval_every": 100, **kw})
    Trainer(tiny(), cfg, ProgressionData()).fit()
    return Path(cfg.out_dir)


def _resume(run: Path, **kw) -> Trainer:
    trainer = Trainer(tiny(), config(run.parent, out_dir=str(run), max_steps=6, save_every=2, eval_every=100, **kw),
                      ProgressionData())
    trainer.fit()
    return trainer


def _point_latest(run: Path, name: str) -> None:
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "dir": name}))


def test_a_planted_pickle_is_never_loaded(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"run_info": _Planted(marker)}, step / "trainer_state.pt")
    _point_latest(run, step.name)
    with pytest.raises(StateError, match=r"trainer_state.pt: .*pickle.*not loaded"):
        _resume(run)
    assert not marker.exists()


def test_checkpoints_hold_json_and_safetensors_and_no_pickle(tmp_path):
    checkpoint = latest_checkpoint(_trained(tmp_path))
    names = {p.name for p in checkpoint.iterdir()}
    assert {"trainer_state.json", "trainer_state.safetensors"} <= names and not any(n.endswith(".pt") for n in names)
    json.loads((checkpoint / "trainer_state.json").read_text())  # plain JSON: readable without lucidlm


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/tmp", "step-00000004/../../../elsewhere", 7])
def test_latest_json_cannot_point_outside_the_checkpoints_folder(tmp_path, pointer):
    run = _trained(tmp_path)
    shutil.copytree(latest_checkpoint(run), tmp_path / "elsewhere")  # a complete checkpoint, outside
    _point_latest(run, pointer)
    with pytest.raises(StateError, match=r"latest.json: 'dir' must name a step-NNNNNNNN folder"):
        _resume(run)


def test_a_symlinked_step_folder_is_refused(tmp_path):
    run = _trained(tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(latest_checkpoint(run), outside)
    (run / "checkpoints" / "step-00000099").symlink_to(outside, target_is_directory=True)
    _point_latest(run, "step-00000099")
    with pytest.raises(StateError, match="not a checkpoint folder inside .*symlink"):
        _resume(run)


def test_the_run_is_checked_before_any_tensor_is_read(tmp_path):
    run = _trained(tmp_path)
    (latest_checkpoint(run) / "trainer_state.safetensors").write_bytes(b"\xff" * 64)  # unreadable tensors
    with pytest.raises(ValueError, match=r"different run.*train.lr"):
        _resume(run, lr=1e-3)
    with pytest.raises(StateError, match="trainer_state.safetensors: not a readable safetensors file"):
        _resume(run)


@pytest.mark.parametrize("where", ["latest.json", "trainer_state.json"])
def test_deeply_nested_json_is_a_clear_error(tmp_path, where):
    run = _trained(tmp_path)
    path = run / "checkpoints" / where if where == "latest.json" else latest_checkpoint(run) / where
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError, match=rf"{where}: JSON nested too deeply"):
        _resume(run)


def test_a_state_tree_nested_past_the_limit_is_refused(tmp_path):
    run = _trained(tmp_path)
    path = latest_checkpoint(run) / "trainer_state.json"
    tree = json.loads(path.read_text())
    tree["guard"] = json.loads("[" * 200 + "]" * 200)  # valid JSON, too deep for any trainer state
    path.write_text(json.dumps(tree))
    with pytest.raises(StateError, match="nested deeper than 64 levels"):
        _resume(run)


def test_resume_from_the_stored_state_is_exact(tmp_path):
    """6 steps straight, then rewound to the step-4 checkpoint and resumed by a fresh Trainer: the same weights."""
    from safetensors.torch import load_file

    run = _trained(tmp_path, max_steps=6)
    straight = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    shutil.rmtree(latest_checkpoint(run))
    _point_latest(run, "step-00000004")
    _resume(run)
    resumed = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name == "step-00000006" and resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_torn_or_hostile_metrics_log_does_not_stop_a_resume(tmp_path):
    from lucidlm.train.metrics import read_metrics

    run = _trained(tmp_path)
    with (run / "metrics.jsonl").open("ab") as f:  # what a kill mid-write, or a planted file, leaves
        f.write(b"[" * 5000 + b"\n" + b'{"step": 2, "loss": \xff}\n' + b'["not a record"]\n' + b'{"step": 5, "lo')
    _resume(run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _read_only(path: Path):
    """Make ``path`` unwritable for this process: permissions, or (root ignores them) the immutable flag."""
    path.chmod(0o555)
    if os.access(path, os.W_OK) and _writable(path):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return not _writable(path)


def _writable(path: Path) -> bool:
    try:
        (path / ".probe").touch()
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "locked"
    path.mkdir()
    if not _read_only(path):
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    yield path
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def test_a_read_only_output_directory_fails_before_training(read_only_dir):
    model = tiny()
    before = [p.clone() for p in model.parameters()]
    cfg = config(read_only_dir.parent, out_dir=str(read_only_dir), max_steps=2, save_every=2)
    with pytest.raises(OutputDirError, match=r"locked/checkpoints is not writable"):
        Trainer(model, cfg, ProgressionData()).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not one step was taken


def test_a_file_in_place_of_the_output_directory_fails_before_training(tmp_path):
    (tmp_path / "taken").write_text("")
    cfg = config(tmp_path, out_dir=str(tmp_path / "taken" / "run"), max_steps=2, save_every=2)
    with pytest.raises(OutputDirError, match=r"taken/run/checkpoints is not writable"):
        Trainer(tiny(), cfg, ProgressionData()).fit()


# --- SFT data: every hostile line is one bad line (named file:line, or skipped and counted) ---------------------
def _chat_tokenizer():
    from lucidlm.tokenizer import byte_tokenizer
    from lucidlm.train.tokenizer_training import CHATML

    tok = byte_tokenizer(("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"))
    tok.config["chat_template"] = tok.chat_template = CHATML
    return tok


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
HOSTILE = {
    "surrogate": (b'{"prompt": "\\ud800", "response": "x"}', r"prompt holds a lone surrogate '\\ud800'"),
    "surrogate in a turn": (b'{"messages": [{"role": "user", "content": "a\\udfff"}, '
                            b'{"role": "assistant", "content": "b"}]}',
                            r"messages\[0\]\.content holds a lone surrogate"),
    "invalid utf-8": (b'{"prompt": "caf\xe9", "response": "x"}', r"not valid UTF-8 \(byte 15"),
    "wizard": (b'{"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}',
               r"messages\[0\]\.role 'wizard' is not one of \['system', 'user', 'assistant'\]"),
    "nested": (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b', "response": "x"}', "JSON nested too deeply"),
}


def _lines(tmp_path: Path, bad: bytes) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    return path


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_sft_line_is_named_or_skipped_and_counted(tmp_path, kind):
    from lucidlm.jsonl import DataError
    from lucidlm.train.sft_data import SFTDataset

    bad, message = HOSTILE[kind]
    path = _lines(tmp_path, bad)
    with pytest.raises(DataError, match=r"chat.jsonl:2: " + message):
        list(SFTDataset([path], _chat_tokenizer(), 64, batch_size=1, epochs=1))
    data = SFTDataset([path], _chat_tokenizer(), 64, batch_size=1, epochs=1, skip_bad_lines=True)
    assert len(list(data)) == 2 and len(data.skipped) == 1 and data.skipped[0].startswith(f"{path}:2: ")


def test_tool_turns_only_with_a_template_that_knows_the_role(tmp_path):
    from lucidlm.jsonl import DataError
    from lucidlm.train.sft_data import SFTDataset

    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"},
                        {"role": "assistant", "content": "4."}]}
    path = tmp_path / "tool.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"messages\[1\]\.role 'tool' is not one of"):
        list(SFTDataset([path], _chat_tokenizer(), 128, batch_size=1, epochs=1))
    tok = _chat_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}<tool>{{ m['content'] }}</tool>"
                         "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert len(list(SFTDataset([path], tok, 128, batch_size=1, epochs=1))) == 1


def test_sft_cli_skips_and_counts_every_hostile_line_or_names_the_first(tmp_path, monkeypatch, capsys):
    import sys

    from lucidlm.apps.cli import main
    from lucidlm.random_checkpoint import build_random_checkpoint

    base = build_random_checkpoint(tmp_path / "base")
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join([GOOD.encode()] + [bad for bad, _ in HOSTILE.values()] + [GOOD.encode()]) + b"\n")
    args = ["lucidlm", "sft", "--model", str(base), "--data", str(path), "--train.max-steps", "2",
            "--train.out-dir", str(tmp_path / "run"), "--batch-size", "1"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "chat.jsonl:2: prompt holds a lone surrogate" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", args + ["--skip-bad-lines"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and f"{len(HOSTILE)} bad lines skipped" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["pretrain", "sft", "dpo"])
def test_training_verbs_refuse_an_unwritable_output_directory_first(tmp_path, monkeypatch, capsys, verb):
    import sys

    from lucidlm.apps.cli import main

    (tmp_path / "taken").write_text("")  # a file where the run directory should go
    args = ["lucidlm", verb, "--data", str(tmp_path / "data.jsonl"), "--train.out-dir", str(tmp_path / "taken" / "r")]
    args += [] if verb == "pretrain" else ["--model", str(tmp_path / "no-model-needed-yet")]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "output directory" in (err := capsys.readouterr().err)
    assert "taken/r is not writable: Not a directory" in err  # named before any model or data is read
