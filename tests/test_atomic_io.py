"""atomic_io: a write is all or nothing, leaves no temporary file, and keeps ordinary permissions."""

from __future__ import annotations

import os

import pytest

from lucidlm.atomic_io import atomic_write, write_text


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_keeps_the_original_when_the_body_raises(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("original")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as tmp:
            assert tmp != path and tmp.parent == path.parent
            tmp.write_text("half writ")
            raise RuntimeError("crash")
    assert path.read_text() == "original"
    assert listing(tmp_path) == ["config.json"]  # no temp file left behind


def test_atomic_write_creates_nothing_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash")
    assert listing(tmp_path) == []


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_write(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing visible until the body finishes
    assert path.read_text() == "new"
    assert listing(tmp_path) == ["out.txt"]


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    with atomic_write(tmp_path / "atomic") as tmp:
        tmp.write_text("x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(plain).st_mode


def test_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "corpus.txt"
    write_text(path, "a much longer first version\n")
    write_text(path, "short\n")
    assert path.read_text() == "short\n" and listing(tmp_path) == ["corpus.txt"]
