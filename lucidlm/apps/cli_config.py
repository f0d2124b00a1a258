"""Command-line verbs driven by a run-config dataclass: ``--config FILE`` plus one option per field.

Every leaf field of the dataclass becomes an option named after it, nested ones dotted and
underscores as dashes (``train.max_steps`` → ``--train.max-steps``), with the field's own help.
Values given on the command line override the file, which overrides the defaults (see
``train/config_file.py``). ``--print-config`` shows the resolved config and exits. The verb is an
ordinary typer command: its signature is generated from the dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from ..train.config_file import build, describe, leaves


def option_name(dotted: str) -> str:
    return "--" + dotted.replace("_", "-")


def config_command(cls: type, run: Callable[[Any], None], doc: str,
                   short: dict[str, str] | None = None) -> Callable[..., None]:
    """A function typer can register (``app.command(name)(fn)``) whose options are ``cls``'s fields; ``short``
    gives some of them a short flag too ({"model": "-m"})."""
    dests: dict[str, str] = {}
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option("--config", help="YAML or TOML file of options; the command line overrides it",
                                      dir_okay=False)]),
        inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--print-config", help="print the resolved config and exit")]),
    ]
    for f in dataclasses.fields(cls):  # optional sections (e.g. lora) switch on with a flag and their defaults
        kind = typing.get_type_hints(cls)[f.name]
        if type(None) in typing.get_args(kind) and any(dataclasses.is_dataclass(t) for t in typing.get_args(kind)):
            dest = "section__" + f.name
            dests[dest] = f.name
            params.append(inspect.Parameter(dest, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                bool, typer.Option(option_name(f.name), help=f"{f.metadata.get('help', '')} (a flag)")]))
    for dotted, kind, f in leaves(cls):
        dest = "opt__" + dotted.replace(".", "__")
        dests[dest] = dotted
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        text = f"{f.metadata.get('help', '')} ({describe(kind)}, default {default})"
        if kind is bool or kind == bool | None:  # --name / --no-name
            flag = option_name(dotted)
            params.append(inspect.Parameter(dest, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                bool | None, typer.Option(f"{flag}/--no-{flag[2:]}", help=text, show_default=False)]))
            continue
        # a list option repeats (--reward a --reward b) or takes commas (--reward a,b); the values are joined
        value_type = list[str] | None if _is_list(kind) else str | None
        flags = [option_name(dotted)] + ([short[dotted]] if short and dotted in short else [])
        params.append(inspect.Parameter(dest, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            value_type, typer.Option(*flags, help=text, metavar="VALUE", show_default=False)]))

    def command(**values: Any) -> None:
        config, print_config = values.pop("config"), values.pop("print_config")
        values = {k: (",".join(v) or None) if isinstance(v, list | tuple) else v for k, v in values.items()}
        overrides = {dests[k]: v for k, v in values.items()
                     if v is not None and not (k.startswith("section__") and v is False)}
        cfg = build(cls, config, overrides)
        if print_config:
            typer.echo(json.dumps(asdict(cfg), indent=2, default=str))
            return
        run(cfg)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    return command


def _is_list(kind: Any) -> bool:
    return any(typing.get_origin(t) in (list, tuple) for t in (kind, *typing.get_args(kind)))
