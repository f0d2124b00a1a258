"""Run configs: dataclasses read from a YAML or TOML file, every field overridable on the command line.

Precedence: the dataclass default < the config file < a command-line option. Nested dataclasses
(``train``, ``lora``) become dotted names: ``train.lr`` in a file section ``[train]`` / ``train:``,
``--train.lr`` on the command line. Each field documents itself with ``opt(default, help)``, and that
help is what ``--help`` prints. Unknown keys and values of the wrong type are errors that name them.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any


def opt(default: Any = MISSING, help: str = "", factory: Any = MISSING) -> Any:
    """A dataclass field that carries its help text."""
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def read_file(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of option names to values")
        return data
    raise ValueError(f"{path}: config files are .yaml, .yml or .toml")


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, type, field) for every non-dataclass field, nested ones flattened."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        inner = _dataclass_in(kind)
        if inner is not None:
            out += leaves(inner, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", kind, f))
    return out


def build(cls: type, file: Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """An instance of ``cls`` from defaults, then ``file``, then ``overrides`` (dotted names)."""
    values = _flatten(read_file(file)) if file is not None else {}
    known = {name: kind for name, kind, _ in leaves(cls)}
    nested = {name.split(".")[0] for name in known if "." in name}
    unknown = sorted(k for k in values if k not in known and k not in nested)
    if unknown:
        raise ValueError(f"{file}: unknown option(s) {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _instantiate(cls, {k: _coerce(k, v, known[k]) if k in known else v for k, v in values.items()}, "")


def _instantiate(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        name = prefix + f.name
        inner = _dataclass_in(hints[f.name])
        if inner is not None:
            section = {k for k in values if k.startswith(name + ".")}
            optional = type(None) in typing.get_args(hints[f.name])
            if section or not optional or values.get(name) is True:
                kwargs[f.name] = _instantiate(inner, values, name + ".")
            elif name in values and values[name] not in (None, False):
                raise ValueError(f"option {name} is a section; set its fields ({name}.<field>)")
        elif name in values:
            kwargs[f.name] = values[name]
    return cls(**kwargs)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dataclass_in(kind: Any) -> type | None:
    for t in (kind, *typing.get_args(kind)):
        if is_dataclass(t):
            return t
    return None


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check (and convert where lossless) a value for a field of type ``kind``."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for t in args:
            if t is type(None):
                continue
            try:
                return _coerce(name, value, t)
            except ValueError:
                continue
        raise ValueError(f"option {name}: {value!r} is not a {kind}")
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"option {name}: expected a list, got {value!r}")
        converted = [_coerce(name, v, args[0]) for v in items] if args else list(items)
        return tuple(converted) if origin is tuple else converted
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"option {name}: expected true or false, got {value!r}")
    if kind is int:
        digits = isinstance(value, str) and value.lstrip("-").isdigit()
        if isinstance(value, bool) or not (isinstance(value, int) or digits):
            raise ValueError(f"option {name}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"option {name}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"option {name}: expected text, got {value!r}")
        return str(value)
    return value


def describe(kind: Any) -> str:
    """A short type name for --help."""
    return str(kind).replace("typing.", "").replace("<class '", "").replace("'>", "")
