"""JSON and JSONL files: reading with errors that name the file (and line), writing atomically.

One definition each for the whole package: every JSON or JSONL file lucidlm reads or writes goes through here
(checkpoint/files.py adds its own file checks for untrusted checkpoint directories and parses with ``parse_json``).

Lines are read as bytes and decoded one by one, so an invalid UTF-8 line is one bad line, not a failed file;
JSON nested past the decoder's recursion limit and lone surrogates ("\ud800", valid JSON but not text) are
bad lines too. ``read_json`` gives whole JSON files the same errors, naming the file. ``read_rows`` reads a JSONL
file row by row (resumable from a line, bad lines raised as ``file:line: ...`` or skipped and counted);
``read_jsonl`` reads one whole. ``write_json`` and ``write_jsonl`` write through ``atomic_io.atomic_write``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .atomic_io import atomic_write


class DataError(ValueError):
    """Input that cannot be used (a dataset row, a JSON file); the message names the file (and line)."""


class JSONSyntaxError(DataError):
    """Not JSON at all: bytes that are not UTF-8, or a syntax error (``loads``, ``decode_utf8``)."""


MAX_PARSE_DEPTH = 500  # arrays/objects inside each other that the parser is given at all
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string: its brackets are text, not nesting
_OPEN, _CLOSE = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)


def json_depth(raw: bytes | str) -> int:
    """How deeply arrays and objects nest in JSON text, counted before parsing: the parser recurses per level, and
    how deep it may go moves with the interpreter's recursion limit (which compilers raise)."""
    raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    codes = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def loads(text: str) -> Any:
    """JSON text, with the failures a hostile file can cause turned into DataError (the caller adds where)."""
    if text.count("[") + text.count("{") > MAX_PARSE_DEPTH and json_depth(text) > MAX_PARSE_DEPTH:  # few: shallow
        raise DataError("JSON nested too deeply")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise JSONSyntaxError(f"{e.msg} ({at})") from None
    except RecursionError:  # the decoder recurses per nesting level
        raise DataError("JSON nested too deeply") from None


def parse_json(raw: bytes, max_depth: int | None = None) -> Any:
    """The JSON value of a whole file's bytes: UTF-8 (a leading BOM allowed), no lone surrogate, and at most
    ``max_depth`` levels of nesting when given. Errors say what is wrong; the caller adds where."""
    text = decode_utf8(raw)
    value = loads(text)
    if max_depth is not None:
        check_depth(value, max_depth)
    if "\\u" in text:  # strict UTF-8 decoding admits no surrogate: only a \u escape can make one
        check_unicode(value)
    return value


def read_json(path: str | Path) -> Any:
    """A whole JSON file; errors name it."""
    path = Path(path)
    try:
        return parse_json(path.read_bytes())
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def check_depth(value: Any, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` (so that every recursive walk after parsing stays far from the
    recursion limit); one pass, no recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > max_depth:
                raise DataError(f"JSON nested too deeply (at most {max_depth} levels)")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a leading BOM (Windows editors) is not part of the JSON
    except UnicodeDecodeError as e:
        raise JSONSyntaxError(f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None


def check_unicode(value: Any) -> None:
    """Refuse lone UTF-16 surrogates ("\\ud800"): valid JSON, but no tokenizer or file can hold them. Iterative,
    so a deeply nested row cannot exhaust the stack here."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where.lstrip('.') or 'the value'} holds a lone surrogate "
                                f"{v[e.start]!r} at character {e.start}: not valid Unicode text") from None
        elif isinstance(v, dict):
            keys = [(f"{where}.{json.dumps(k)[1:-1]}", k) for k in v]  # escaped: the message itself must encode
            stack += keys + [(name, x) for (name, _), x in zip(keys, v.values())]
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]


def parse_line(raw: bytes) -> dict:
    """One JSONL line (bytes, so that one undecodable line fails alone) → a JSON object."""
    row = parse_json(raw)
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    return row


SKIP_HINT = " (pass skip_bad_lines to skip such lines)"


def read_rows(path: Path, start_line: int, parse: Callable[[dict], Any], skip_bad_lines: bool,
              on_skip: Callable[[str], None]) -> Iterator[tuple[int, Any]]:
    """(line number, parse(row)) for the rows after ``start_line`` (1-based numbers; blank lines ignored)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number <= start_line or not raw.strip():
                continue
            try:
                parsed = parse(parse_line(raw))
            except DataError as e:
                message = f"{path}:{number}: {e}"
                if not skip_bad_lines:
                    raise DataError(message + SKIP_HINT) from None
                on_skip(message)
                continue
            yield number, parsed


def read_jsonl(path: str | Path) -> list[dict]:
    """Every row of a JSONL file (blank lines ignored); the first bad line raises DataError naming file:line."""
    try:
        return [row for _, row in read_rows(Path(path), 0, lambda row: row, False, lambda _: None)]
    except DataError as e:
        raise DataError(str(e).removesuffix(SKIP_HINT)) from None


def write_json(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
    """``data`` as one JSON file (+ a final newline), written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically (a reader never sees half a file)."""
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
