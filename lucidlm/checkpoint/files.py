"""Every file lucidlm reads from a checkpoint (or adapter) directory is found and opened here.

A checkpoint is untrusted data: its names (a sharded index's ``weight_map``, symlinks) must not lead
outside it, a FIFO or device must never be opened (it would block or have side effects), and a JSON file
must not be huge or nested deep enough to exhaust the recursion limit. ``resolve_inside`` and
``checkpoint_file`` find a file; ``read_text`` / ``read_json`` read one (the JSON parsed by jsonl.py's
``parse_json``); every error names the file.

Symlinks are followed only to targets inside the directory, with one exception: a Hugging Face hub cache
snapshot (``models--org--name/snapshots/<rev>/``) whose files link into the repository's ``blobs/``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..jsonl import DataError, JSONSyntaxError, parse_json
from .errors import CheckpointError

MAX_JSON_BYTES = 64 * 2**20  # config/index/tokenizer_config files are KBs to a few MBs
MAX_TOKENIZER_BYTES = 512 * 2**20  # tokenizer.json: the largest real ones are ~35 MB
MAX_TEMPLATE_BYTES = 1 * 2**20  # chat_template.jinja (the renderer accepts 256K characters)
MAX_JSON_DEPTH = 64  # real files nest < 10 deep; json and every recursive walk after it stay far from 1000


def _roots(directory: Path) -> list[Path]:
    """The real folders a checkpoint's files may resolve into."""
    root = directory.resolve()
    roots = [root]
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
        roots.append(repo / "blobs")  # the hub cache's layout: snapshots/<rev>/file -> ../../blobs/<hash>
    return roots


def resolve_inside(directory: str | Path, name: str | Path) -> Path:
    """``directory / name`` with every symlink resolved, refused unless it stays inside ``directory``
    (an absolute ``name`` or ``..`` leaves it just as a symlink to elsewhere does)."""
    directory = Path(directory)
    shown = directory / name
    try:
        real = shown.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{shown}: cannot resolve the path ({e})") from e
    if not any(real.is_relative_to(root) for root in _roots(directory)):
        raise CheckpointError(f"{shown}: resolves to {real}, outside the checkpoint directory "
                              f"{directory.resolve()}; refusing to read it")
    return real


def has_file(directory: str | Path, name: str) -> bool:
    """Whether the checkpoint has an entry ``name`` (a dangling or outside symlink counts: it is refused
    when read, not silently skipped)."""
    return os.path.lexists(Path(directory) / name)


def checkpoint_file(directory: str | Path, name: str | Path, max_bytes: int | None = None) -> Path:
    """The real path of the regular file ``directory / name``: inside the directory, never a FIFO, device
    or folder (checked with stat, before anything opens it), at most ``max_bytes`` long."""
    shown = Path(directory) / name
    real = resolve_inside(directory, name)
    try:
        st = os.stat(real)
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot read it ({e.strerror or e})") from e
    _check_stat(shown, st, max_bytes)
    return real


def regular_file(path: str | Path, max_bytes: int | None = None) -> Path:
    """The real path of a file the user named (no directory to stay inside), checked like ``checkpoint_file``."""
    shown = Path(path)
    try:
        real = shown.resolve()
        st = os.stat(real)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{shown}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    _check_stat(shown, st, max_bytes)
    return real


def _check_stat(shown: Path, st: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{shown}: is {kind}, not a regular file; refusing to open it")
    if max_bytes is not None and st.st_size > max_bytes:
        raise CheckpointError(f"{shown}: {st.st_size} bytes, more than the {max_bytes} such a file may have")


def read_bytes(directory: str | Path, name: str | Path, max_bytes: int) -> bytes:
    shown = Path(directory) / name
    real = checkpoint_file(directory, name, max_bytes)
    try:  # O_NONBLOCK: should the file have become a FIFO since the stat, opening it still cannot block
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot read it ({e.strerror or e})") from e
    with os.fdopen(fd, "rb") as f:
        _check_stat(shown, os.fstat(f.fileno()), max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{shown}: more than the {max_bytes} bytes such a file may have")
    return data


def read_text(directory: str | Path, name: str | Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    data = read_bytes(directory, name, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{Path(directory) / name}: not UTF-8 text ({e})") from e


def read_json(directory: str | Path, name: str | Path, expect: type | None = dict, what: str | None = None,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON file ``directory / name``; ``expect``: the type its top level must have; ``what``:
    what the file is, for the messages ("safetensors index")."""
    where = f"{Path(directory) / name}: " + (f"not a valid {what}: " if what else "")
    try:
        data = parse_json(read_bytes(directory, name, max_bytes), max_depth=MAX_JSON_DEPTH)
    except JSONSyntaxError as e:
        raise CheckpointError(f"{where}invalid JSON ({e})") from None
    except DataError as e:  # nested too deeply, a lone surrogate
        raise CheckpointError(f"{where}{e}") from None
    if expect is not None and not isinstance(data, expect):
        raise CheckpointError(f"{where}expected a JSON {_JSON_NAMES.get(expect, expect.__name__)}, got "
                              f"{_JSON_NAMES.get(type(data), type(data).__name__)} ({type(data).__name__})")
    return data


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}
