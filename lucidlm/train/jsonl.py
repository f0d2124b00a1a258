"""JSONL reading shared by the SFT, preference and probe datasets: one JSON object per line, errors that name
the file and line, optionally skipped and counted instead.

Lines are read as bytes and decoded one by one, so an invalid UTF-8 line is one bad line, not a failed file;
JSON nested past the decoder's recursion limit and lone surrogates ("\ud800", valid JSON but not text) are
bad lines too. ``read_json`` gives whole JSON files the same errors, naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Input that cannot be used (a dataset row, a JSON file); the message names the file (and line)."""


def loads(text: str) -> Any:
    """JSON text, with the failures a hostile file can cause turned into DataError (the caller adds where)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise DataError(f"{e.msg} ({at})") from None
    except RecursionError:  # the decoder recurses per nesting level
        raise DataError("JSON nested too deeply") from None


def read_json(path: Path) -> Any:
    """A whole JSON file; errors name it."""
    try:
        return loads(decode_utf8(path.read_bytes()))
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a leading BOM (Windows editors) is not part of the JSON
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None


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
                raise DataError(f"{where.lstrip('.') or 'the row'} holds a lone surrogate "
                                f"{v[e.start]!r} at character {e.start}: not valid Unicode text") from None
        elif isinstance(v, dict):
            keys = [(f"{where}.{json.dumps(k)[1:-1]}", k) for k in v]  # escaped: the message itself must encode
            stack += keys + [(name, x) for (name, _), x in zip(keys, v.values())]
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]


def parse_line(raw: bytes) -> dict:
    """One JSONL line (bytes, so that one undecodable line fails alone) → a JSON object."""
    text = decode_utf8(raw)
    row = loads(text)
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if "\\u" in text:  # strict UTF-8 decoding admits no surrogate: only a \u escape can make one
        check_unicode(row)
    return row


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


ROLES = ("system", "user", "assistant")  # + "tool" where the chat template has a branch for it (chat_roles)


def chat_roles(chat_template: str | list | dict | None) -> tuple[str, ...]:
    """The roles a conversation may use with this template: system, user, assistant, and tool when the template
    names the role 'tool' (a template without such a branch would render a tool turn as if it were another)."""
    source = chat_template if isinstance(chat_template, str) else str(chat_template)  # named templates: all of them
    return ROLES + ("tool",) if "'tool'" in source or '"tool"' in source else ROLES


def messages_field(row: dict, name: str = "messages", roles: tuple[str, ...] = ROLES) -> list[dict]:
    messages = row.get(name)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field {name!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in roles:
            raise DataError(f"{name}[{i}].role {m['role'][:40]!r} is not one of {list(roles)}")
    return messages


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically (a reader never sees half a file)."""
    from ..checkpoint.safetensors_io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
