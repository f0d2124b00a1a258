"""jsonl: JSON and JSONL files read with errors naming the file (and line), written atomically."""

from __future__ import annotations

import json

import pytest

from lucidlm.jsonl import (
    DataError,
    JSONSyntaxError,
    json_depth,
    parse_json,
    read_json,
    read_jsonl,
    read_rows,
    write_json,
    write_jsonl,
)


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_json_round_trip(tmp_path):
    data = {"model_type": "llama", "rope_parameters": {"rope_theta": 500000.0, "factor": 8.0},
            "eos_token_id": [1, 2], "pad_token_id": None, "name": "lüc\u00efd"}
    path = tmp_path / "config.json"
    write_json(path, data)
    assert json.loads(path.read_text()) == data
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert listing(tmp_path) == ["config.json"]


def test_write_json_that_cannot_serialise_keeps_the_original(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert listing(tmp_path) == ["config.json"]


def test_jsonl_round_trip_ignores_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"a": 1}, {"b": "lüc\u00efd"}]
    write_jsonl(path, rows)
    path.write_text(path.read_text() + "\n\n")
    assert read_jsonl(path) == rows and listing(tmp_path) == ["rows.jsonl"]


def test_a_bad_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n[1, 2]\n{"b": \n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: expected a JSON object, got list$"):
        read_jsonl(path)
    skipped = []
    rows = list(read_rows(path, 0, lambda r: r, skip_bad_lines=True, on_skip=skipped.append))
    assert rows == [(1, {"a": 1})] and [m.split(": ")[0] for m in skipped] == [f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("raw, error, words", [
    (b'{"a": ', JSONSyntaxError, "Expecting value"),
    (b"caf\xe9", JSONSyntaxError, "not valid UTF-8 (byte 3"),
    (b"[" * 100_000 + b"]" * 100_000, DataError, "JSON nested too deeply"),
    (b'{"k": ["\\ud800"]}', DataError, "k[0] holds a lone surrogate"),
])
def test_parse_json_names_what_is_wrong(raw, error, words):
    with pytest.raises(error) as e:
        parse_json(raw)
    assert words in str(e.value)


def test_parse_json_bounds_the_depth_when_asked():
    deep = b'{"a": ' * 10 + b"1" + b"}" * 10
    assert parse_json(deep)["a"]["a"]
    with pytest.raises(DataError, match=r"nested too deeply \(at most 5 levels\)"):
        parse_json(deep, max_depth=5)


def test_read_json_names_the_file_and_accepts_a_bom(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"x": 1}).encode())
    assert read_json(path) == {"x": 1}
    path.write_text("{oops")
    with pytest.raises(DataError, match=rf"^{path}: Expecting property name"):
        read_json(path)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@pytest.mark.parametrize("value", [[], {}, "[[[", {"a": [1, {"b": "]]\"[{"}], "c": [[[]]]}, [["\\", ["\\\""]]],
                                   {"messages": [{"role": "user", "content": [{"type": "text", "text": "{[x]}"}]}]}])
def test_the_nesting_depth_is_counted_outside_strings(value):
    """Checked before parsing (the parser's own limit moves with the interpreter's recursion limit, which compilers
    raise): brackets inside strings, escaped quotes included, do not count."""
    assert json_depth(json.dumps(value).encode()) == _depth(value)
