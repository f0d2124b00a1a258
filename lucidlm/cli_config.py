"""Command-line verbs driven by a run-config dataclass: ``--config FILE`` plus one option per field.

Every leaf field of the dataclass (nested ones dotted: ``--train.lr``) becomes an option whose help
is the field's own; values given on the command line override the file, which overrides defaults
(see ``train/config_file.py``). ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, asdict
from pathlib import Path
from typing import Any

import click

from .train.config_file import build, describe, leaves


def config_command(name: str, cls: type, run: Callable[[Any], None], help: str) -> click.Command:
    params: list[click.Parameter] = [
        click.Option(["--config"], type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="YAML or TOML file with the run's options; command-line options override it"),
        click.Option(["--print-config"], is_flag=True, default=False, help="print the resolved config and exit"),
    ]
    dests: dict[str, str] = {}
    for dotted, kind, f in leaves(cls):
        dest = dotted.replace(".", "__")
        dests[dest] = dotted
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory
                                                                is not MISSING else None)
        text = f"{f.metadata.get('help', '')}  [{describe(kind)}; default: {default}]"
        params.append(click.Option([f"--{dotted}", dest], default=None, help=text, metavar="VALUE"))

    def callback(config: Path | None, print_config: bool, **values: Any) -> None:
        overrides = {dests[k]: v for k, v in values.items() if v is not None}
        cfg = build(cls, config, overrides)
        if print_config:
            click.echo(json.dumps(asdict(cfg), indent=2, default=str))
            return
        run(cfg)

    return click.Command(name, params=params, callback=callback, help=help, short_help=help.split("\n")[0])
