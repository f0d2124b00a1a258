"""Training checkpoints: written atomically, found again for an exact resume.

Layout under ``out_dir/checkpoints/``:
  step-00000100/       model weights (HF layout via ``save_model`` for a Transformer)
                       + trainer_state.json and trainer_state.safetensors (see ``state_io.py``)
  latest.json          {"step": 100, "dir": "step-00000100"}: the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place only when complete,
then ``latest.json`` is replaced in one rename: a run killed at any moment leaves either the old or the
new checkpoint, never half of one. The trainer state holds everything else an exact resume needs: the
optimizer and scheduler, every RNG, the data position, the spike guard and the run's config.

Resuming reads files someone else may have planted, so nothing here can run code: the state is JSON +
safetensors (no pickle), ``latest.json`` may only name a step folder directly inside ``checkpoints/``
(no ``..``, no symlink out), and the run identity is checked on the JSON before any tensor is read.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from ..jsonl import read_json, write_json
from .state_io import TENSOR_FILE, TREE_FILE, StateError, decode, read_tensors, read_tree, write_state

STATE_FILES = (TREE_FILE, TENSOR_FILE)
LEGACY_STATE_FILE = "trainer_state.pt"  # a pickle, written before trainer state was JSON + safetensors
STEP_DIR = re.compile(r"step-\d{8,}")


class OutputDirError(ValueError):
    """An output directory that cannot be written (read-only, immutable, a file in the way, ...)."""


def ensure_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove a file can be made in it, so that a read-only filesystem, an
    immutable or foreign directory fails now, before hours of training, and not at the first checkpoint."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)  # permissions alone miss root, chattr +i
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, which must be a step folder directly inside ``checkpoints/``."""
    root = checkpoint_root(out_dir)
    pointer = root / "latest.json"
    if not pointer.exists():
        return None
    data = read_json(pointer)
    name = data.get("dir") if isinstance(data, dict) else None
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
        raise StateError(f"{pointer}: 'dir' must name a step-NNNNNNNN folder in {root}, got {name!r}")
    path = root / name
    if path.is_symlink() or path.resolve().parent != root.resolve() or not path.is_dir():
        raise StateError(f"{pointer}: {path} is not a checkpoint folder inside {root} (missing, or a symlink)")
    return path


def save_checkpoint(out_dir: Path, step: int, save_weights: Callable[[Path], None], state: dict,
                    keep: int = 2) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        save_weights(tmp)
        write_state(tmp, state)
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


def load_state(checkpoint: Path, check_run: Callable[[dict], None] | None = None) -> dict:
    """The trainer state of ``checkpoint``. ``check_run(run_info)`` sees the run identity, read from the JSON
    alone: a checkpoint of another run is refused before any tensor is read."""
    if not (checkpoint / TREE_FILE).exists() and (checkpoint / LEGACY_STATE_FILE).exists():
        raise StateError(f"{checkpoint / LEGACY_STATE_FILE}: trainer state from an older lucidlm, a pickle that could "
                         "run code when read, so it is not loaded. Start over (another out_dir, or resume=False); "
                         "the weights in that folder can still seed a new run (--model.init).")
    tree = read_tree(checkpoint)
    if check_run is not None:
        check_run(decode(tree.get("run_info"), None, str(checkpoint / TREE_FILE)))
    state = decode(tree, read_tensors(checkpoint), str(checkpoint / TREE_FILE))
    missing = [k for k in ("step", "optimizer", "rng", "run_info") if k not in state]
    if missing:
        raise StateError(f"{checkpoint / TREE_FILE}: not a trainer state (no {missing})")
    return state


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
