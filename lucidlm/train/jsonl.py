"""JSONL reading shared by the SFT and preference datasets: one JSON object per line, errors that name
the file and line, optionally skipped and counted instead."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset row that cannot be used; the message names the file and line."""


def read_rows(path: Path, start_line: int, parse: Callable[[dict], Any], skip_bad_lines: bool,
              on_skip: Callable[[str], None]) -> Iterator[tuple[int, Any]]:
    """(line number, parse(row)) for the rows after ``start_line`` (1-based numbers; blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number <= start_line or not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}")
                parsed = parse(row)
            except (json.JSONDecodeError, DataError) as e:
                message = f"{path}:{number}: {e.msg if isinstance(e, json.JSONDecodeError) else e}"
                if not skip_bad_lines:
                    raise DataError(message + " (pass skip_bad_lines to skip such lines)") from None
                on_skip(message)
                continue
            yield number, parsed


def text_field(row: dict, *names: str, required: bool = True) -> str | None:
    """The first of ``names`` present in the row, which must be a string."""
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise DataError(f"field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise DataError(f"missing field: one of {list(names)}")
    return None


def messages_field(row: dict, name: str = "messages") -> list[dict]:
    messages = row.get(name)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field {name!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{name}[{i}] must be an object with string 'role' and 'content'")
    return messages


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically (a reader never sees half a file)."""
    from ..checkpoint.safetensors_io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
