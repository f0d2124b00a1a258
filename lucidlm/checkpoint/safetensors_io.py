"""Reading and writing safetensors checkpoints: lazily, safely (never unpickling), atomically.

Reading opens every file once to read its header (names, shapes, dtypes) without touching the
data; tensors are then read one at a time from the memory-mapped file, so loading never needs
more memory than the model itself. Writing goes to a temporary file that is renamed into place,
so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic_io import atomic_write
from ..jsonl import write_json
from .errors import CheckpointError
from .files import checkpoint_file, has_file, read_json

DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
# integer and boolean tensors are masks or indices, never weights: casting one to float would hide the damage
NOT_FLOAT = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


class SafetensorsReader:
    """All tensors of a checkpoint directory (one file or a sharded index), read on demand.
    ``single`` / ``index``: the file names to look for (a PEFT adapter has its own single file)."""

    def __init__(self, directory: str | Path, single: str = SINGLE_FILE, index: str | None = INDEX_FILE) -> None:
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for file in self._files(single, index):
            handle = self._open(file)
            for name in handle.keys():
                if name in self.tensors:  # two shards with one name: which one is meant is anyone's guess
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {self.tensors[name].file} and {file}")
                sl = handle.get_slice(name)
                self.tensors[name] = TensorInfo(file, tuple(sl.get_shape()), sl.get_dtype())

    def _files(self, single: str, index: str | None) -> list[Path]:
        """The shard files (as named in the directory; each checked to be a regular file inside it)."""
        if index is not None and has_file(self.directory, index):
            return self._shards(index)
        if has_file(self.directory, single):
            checkpoint_file(self.directory, single)
            return [self.directory / single]
        pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in self.directory.glob(pattern))
        hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        names = f"{single} or {index}" if index is not None else single
        raise CheckpointError(f"{self.directory}: no {names}{hint}")

    def _shards(self, index: str) -> list[Path]:
        weight_map = read_json(self.directory, index, what="safetensors index").get("weight_map")
        path = self.directory / index
        if weight_map is None:
            raise CheckpointError(f"{path}: not a valid safetensors index (it has no 'weight_map')")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard file names")
        names = sorted(set(weight_map.values()))
        missing = [str(self.directory / f) for f in names if not has_file(self.directory, f)]
        if missing:
            raise CheckpointError(f"{path} names shard files that do not exist: {missing}")
        for name in names:  # a name with .. or an absolute path leaves the directory: refused here
            checkpoint_file(self.directory, name)
        return [self.directory / f for f in names]

    def _open(self, file: Path):
        real = checkpoint_file(self.directory, file.relative_to(self.directory))  # again, right before opening
        try:
            handle = safe_open(str(real), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e
        self._handles[file] = handle
        return handle

    def nbytes(self, name: str) -> int:
        info = self.tensors[name]
        return math.prod(info.shape) * DTYPE_BYTES.get(info.dtype, 4)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        try:
            return self._handles[info.file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e})") from e


def require_float(tensors: dict[str, TensorInfo], names: list[str]) -> None:
    """Refuse integer or boolean tensors among ``names`` (loading would cast them to float silently)."""
    for name in names:
        info = tensors[name]
        if info.dtype in NOT_FLOAT:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; a weight must be a "
                                  "floating-point tensor (F32, F16, BF16, ...)")


def write_safetensors(
    directory: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Write tensors as model.safetensors, or as shards plus an index when larger than one shard."""
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        with atomic_write(directory / name) as tmp:
            save_file(shard, str(tmp), metadata=meta)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {t: n for shard, n in zip(shards, names) for t in shard}
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        stale = directory / SINGLE_FILE
    else:
        stale = directory / INDEX_FILE
    if stale.exists():  # an older save in the other layout would shadow or confuse this one
        stale.unlink()
    for old in directory.glob("model-*-of-*.safetensors"):  # shards of an older save that this one has not replaced
        if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old.name) and old.name not in names:
            old.unlink()
    return [directory / n for n in names]


def read_small_tensors(directory: str | Path, name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of a small head file in ``directory`` (a probe's, a reward model's) when they are exactly
    ``shapes`` and finite: the file resolved inside the directory (no link out of it), read without unpickling.
    CheckpointError naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = checkpoint_file(directory, name)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != shapes:
        raise CheckpointError(f"{path}: expected tensors {shapes}, got {got}")
    bad = [k for k, v in state.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} hold NaN or inf")
    return state
