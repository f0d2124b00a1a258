"""Atomic writes: a file appears whole or not at all.

``atomic_write(path)`` yields a fresh temporary path next to ``path``; when the body succeeds the temporary file
replaces ``path`` in one rename (``os.replace``, atomic on POSIX and Windows), and when it raises, the temporary
file is removed and ``path`` is left as it was. A reader therefore never sees half a checkpoint, a torn JSON file
or a half-drawn PNG, whatever kills the writer. Every file lucidlm writes for others to read goes through here
(JSON and JSONL through ``jsonl.write_json`` / ``write_jsonl``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _claim_temporary(path: Path) -> Path:
    # A fresh name claimed with O_EXCL, as mkstemp does, but created with mode 0o666 so that the
    # umask decides the final permissions (mkstemp's 0o600 would make a checkpoint private).
    while True:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename. The temporary
    name ends in ``.tmp``: a writer that infers the format from the suffix needs it spelled out
    (``fig.savefig(tmp, format="png")``)."""
    path = Path(path)
    tmp = _claim_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) as the whole of ``path``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
