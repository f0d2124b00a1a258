"""Training checkpoints: written atomically, found again for an exact resume.

Layout under ``out_dir/checkpoints/``:
  step-00000100/       model weights (HF layout via ``save_model`` for a Transformer) + trainer_state.pt
  latest.json          {"step": 100, "dir": "step-00000100"}: the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place only when complete,
then ``latest.json`` is replaced in one rename: a run killed at any moment leaves either the old or the
new checkpoint, never half of one. trainer_state.pt holds everything else an exact resume needs: the
optimizer and scheduler, every RNG, the data position, the spike guard and the run's config.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint.safetensors_io import write_json

STATE_FILE = "trainer_state.pt"


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest.json"
    if not pointer.exists():
        return None
    return checkpoint_root(out_dir) / json.loads(pointer.read_text())["dir"]


def save_checkpoint(out_dir: Path, step: int, save_weights: Callable[[Path], None], state: dict,
                    keep: int = 2) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        save_weights(tmp)
        torch.save(state, tmp / STATE_FILE)
        final = root / name
        if final.exists():  # a rollback re-saving the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_json(root / "latest.json", {"step": step, "dir": name})
    _prune(root, keep, current=name)
    return root / name


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
