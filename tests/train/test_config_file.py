"""Run configs: defaults < YAML/TOML file < command line; unknown names and wrong types are named."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lucidlm.train.config_file import build, leaves, opt
from lucidlm.train.trainer import TrainConfig


@dataclass
class Adapter:
    r: int = opt(8, "rank")
    targets: list[str] = opt(factory=lambda: ["q_proj"], help="modules")


@dataclass
class Run:
    data: list[str] = opt(factory=list, help="files")
    block_size: int = opt(128, "tokens per block")
    train: TrainConfig = opt(factory=TrainConfig, help="trainer")
    lora: Adapter | None = opt(None, "LoRA, when given")


def test_leaves_are_dotted_and_documented():
    names = {name: f.metadata["help"] for name, _, f in leaves(Run)}
    assert names["train.lr"] == "peak learning rate" and names["lora.r"] == "rank"
    assert all(names.values())  # every option explains itself


def test_file_then_command_line(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("data: [a.txt, b.txt]\nblock_size: 64\ntrain:\n  lr: 0.001\n  max_steps: 50\n")
    run = build(Run, yaml, {"train.lr": "2e-3", "block_size": None})
    assert run.data == ["a.txt", "b.txt"] and run.block_size == 64
    assert run.train.lr == 0.002 and run.train.max_steps == 50 and run.train.warmup_steps == 100
    assert run.lora is None
    toml = tmp_path / "run.toml"
    toml.write_text('data = ["c.txt"]\n[lora]\nr = 4\ntargets = ["q_proj", "v_proj"]\n[train]\nprecision = "bf16"\n')
    run = build(Run, toml, {"lora.targets": "k_proj,o_proj"})
    assert run.lora == Adapter(4, ["k_proj", "o_proj"]) and run.train.precision == "bf16"
    assert build(Run, None, {"lora.r": "16"}).lora.r == 16  # a section is enabled by any of its fields


def test_errors_name_the_option(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("block_sise: 64\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['block_sise'\]"):
        build(Run, bad)
    with pytest.raises(ValueError, match="option train.max_steps: expected an integer, got 'many'"):
        build(Run, None, {"train.max_steps": "many"})
    with pytest.raises(ValueError, match="config files are .yaml"):
        (tmp_path / "x.ini").write_text("")
        build(Run, tmp_path / "x.ini")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(Run, tmp_path / "missing.yaml")
