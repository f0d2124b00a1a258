"""Trainer state without pickle: a tree stored as JSON (its structure, numbers and strings) + safetensors (its
tensors). Neither format can run code when read, unlike ``torch.load(weights_only=False)``.

The tree holds dicts, lists, tuples, str, int, float (NaN and inf included), bool, None, tensors and numeric
numpy arrays (the numpy RNG state). JSON has no tuples, non-string keys or tensors, so those are written as
one-key markers: ``{"__tuple__": [...]}``, ``{"__items__": [[key, value], ...]}``, ``{"__tensor__": name}``,
``{"__ndarray__": [...], "dtype": "uint32"}``. Decoding is exact: a resumed run sees the same values, types
included (Python's ``random.setstate`` needs its tuples back; an optimizer its integer parameter ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TREE_FILE, TENSOR_FILE = "trainer_state.json", "trainer_state.safetensors"
MARKERS = ("__tuple__", "__items__", "__tensor__", "__ndarray__")
MAX_DEPTH = 64  # far deeper than any trainer state; bounds the recursion on a planted file


class StateError(ValueError):
    """A trainer-state file that cannot be read back as written (the message names the file)."""


def encode(value: Any, tensors: dict[str, torch.Tensor], where: str = "state", depth: int = 0) -> Any:
    """``value`` as JSON-ready data; its tensors are moved into ``tensors`` (named t0, t1, ...)."""
    if depth > MAX_DEPTH:
        raise TypeError(f"trainer state nested deeper than {MAX_DEPTH} levels at {where}")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        items = [encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in MARKERS for k in value):
            return {k: encode(v, tensors, f"{where}.{k}", depth + 1) for k, v in value.items()}
        return {"__items__": [[encode(k, tensors, f"{where} key", depth + 1), encode(v, tensors, f"{where}[{k!r}]",
                                                                                     depth + 1)]
                              for k, v in value.items()]}
    raise TypeError(f"trainer state at {where}: cannot store a {type(value).__name__} (dicts, lists, tuples, "
                    "numbers, strings, tensors and numpy arrays only)")


def decode(data: Any, tensors: dict[str, torch.Tensor] | None, where: str, depth: int = 0) -> Any:
    """The inverse of ``encode``; ``tensors=None`` decodes a part that must hold no tensor (the run identity)."""
    if depth > MAX_DEPTH:
        raise StateError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(v, tensors, where, depth + 1) for v in data]
    if not isinstance(data, dict):
        raise StateError(f"{where}: unexpected JSON value {type(data).__name__}")
    marker = next((m for m in MARKERS if m in data), None)
    if marker is None:
        return {k: decode(v, tensors, where, depth + 1) for k, v in data.items()}
    body = data[marker]
    if marker == "__tensor__":
        if tensors is None or not isinstance(body, str) or body not in tensors:
            raise StateError(f"{where}: tensor {body!r} is not in {TENSOR_FILE}")
        return tensors[body]
    if marker == "__ndarray__":
        try:
            dtype = np.dtype(str(data.get("dtype")))
            if dtype.kind in "biuf" and isinstance(body, list):
                return np.asarray(body, dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            pass
        raise StateError(f"{where}: a numpy array must be a list of numbers with a numeric dtype")
    if not isinstance(body, list):
        raise StateError(f"{where}: {marker} must hold a list")
    if marker == "__tuple__":
        return tuple(decode(v, tensors, where, depth + 1) for v in body)
    if not all(isinstance(kv, list) and len(kv) == 2 for kv in body):
        raise StateError(f"{where}: __items__ must be [key, value] pairs")
    out = {}
    for k, v in body:
        key = decode(k, tensors, where, depth + 1)
        try:
            out[key] = decode(v, tensors, where, depth + 1)
        except TypeError:  # an unhashable key
            raise StateError(f"{where}: a dict key must be a number, string or tuple of them") from None
    return out


def write_state(directory: Path, state: dict) -> None:
    """``state`` as TREE_FILE + TENSOR_FILE in ``directory`` (the caller makes the directory appear atomically)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = encode(state, tensors)
    save_file(tensors, str(directory / TENSOR_FILE))
    (directory / TREE_FILE).write_text(json.dumps(tree))


def read_tree(directory: Path) -> dict:
    """The JSON half of a trainer state: no tensor is read."""
    from ..jsonl import read_json

    tree = read_json(_regular(directory / TREE_FILE))
    if not isinstance(tree, dict):
        raise StateError(f"{directory / TREE_FILE}: expected a JSON object")
    return tree


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _regular(directory / TENSOR_FILE)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StateError(f"{path}: not a readable safetensors file ({e})") from None


def _regular(path: Path) -> Path:
    """Trainer state lives in the checkpoint's own regular files: no symlink to elsewhere, no FIFO."""
    if path.is_symlink() or not path.is_file():
        raise StateError(f"{path}: missing, or not a regular file inside the checkpoint")
    return path
