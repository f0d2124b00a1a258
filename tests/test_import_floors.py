"""The floors of docs/ARCHITECTURE.md hold: no module imports from a floor above its own, nor from another entry
of its own floor (entries on one line are peers, independent of each other).

Every ``import`` and ``from ... import`` of every module under lucidlm/ is read with ``ast``: relative ones,
ones inside functions, and ones under ``if TYPE_CHECKING:`` (a type annotation is a dependency on the concept
too). The floors are read from the doc's "Floors" section, so the doc and this test cannot drift: a module no
floor names, or an entry that names no module, fails as well.

Floor entries: ``name/`` (a package, everything under it), ``name.py`` (one module, a glob allowed), and
``package/module.py`` (one module of a package placed on its own floor; the most specific entry wins).
"""

from __future__ import annotations

import ast
import fnmatch
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lucidlm"

# (importing module, imported module) pairs that break a floor today, each with the work that removes it.
# An entry no longer needed is reported as a warning (other work may land first): delete it when its import goes.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Entry:
    pattern: str  # as the doc writes it: "serve/", "api.py", "checkpoint/files.py"
    floor: int  # 0 = the bottom floor

    def matches(self, rel: str) -> bool:
        if self.pattern.endswith("/"):
            return rel.startswith(self.pattern)
        return fnmatch.fnmatchcase(rel, self.pattern)

    @property
    def specificity(self) -> tuple[int, int]:
        return (0 if self.pattern.endswith("/") else 1, len(self.pattern))


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.imported}: {self.why}"


def parse_floors(doc: str) -> list[Entry]:
    """The entries of the first code block after the "## Floors" heading; its top line is the highest floor."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Floors")), None)
    if start is None:
        raise AssertionError("docs/ARCHITECTURE.md has no '## Floors' section")
    opening = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    rows = [line for line in lines[opening + 1:closing] if line.strip()]
    entries = []
    for floor, row in enumerate(reversed(rows)):
        names = re.split(r"\s{2,}", row.strip(), maxsplit=1)[0]
        entries += [Entry(name.strip(), floor) for name in names.split(",") if name.strip()]
    return entries


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported module of this package) for every import statement in the file, wherever it sits."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    root = module.split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else base))
    return [(line, name) for line, name in found if name == root or name.startswith(root + ".")]


def owner(rel: str, entries: list[Entry]) -> Entry | None:
    candidates = [e for e in entries if e.matches(rel)]
    return max(candidates, key=lambda e: e.specificity) if candidates else None


def check(package_dir: Path, doc: str, allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Every problem with the floors: imports that run up a floor or across one (but those ``allowed``), modules
    no floor names, entries that name no module."""
    entries, modules = parse_floors(doc), module_files(package_dir)
    allowed = allowed or {}
    rel = {name: path.relative_to(package_dir).as_posix() for name, path in modules.items()}
    problems: list[str] = []
    for entry in entries:
        if not any(entry.matches(r) for r in rel.values()):
            problems.append(f"floor entry {entry.pattern!r} names no module under {package_dir.name}/")
    for module, path in modules.items():
        mine = owner(rel[module], entries)
        if mine is None:
            problems.append(f"{module} ({rel[module]}) is on no floor of the Floors section")
            continue
        for line, imported in imports_of(module, path, modules):
            target = modules.get(imported)
            theirs = owner(rel[imported], entries) if target is not None else None
            if theirs is None or theirs == mine or theirs.floor < mine.floor:
                continue
            if (module, imported) in allowed:
                continue
            where = "a floor above" if theirs.floor > mine.floor else "another entry of the same floor"
            problems.append(str(Violation(module, line, imported,
                                          f"{theirs.pattern!r} is {where} {mine.pattern!r}")))
    return sorted(set(problems), key=problems.index)  # `from m import a, b` is one import of m


def stale(package_dir: Path, allowed: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
    """The allow-list entries whose import is gone."""
    modules = module_files(package_dir)
    return [(module, imported) for module, imported in allowed
            if module not in modules or imported not in {name for _, name in imports_of(module, modules[module],
                                                                                         modules)}]


def test_no_module_imports_up_a_floor():
    problems = check(ROOT / PACKAGE, (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8"), ALLOWED)
    assert not problems, "\n".join(problems)
    for pair in stale(ROOT / PACKAGE, ALLOWED):
        warnings.warn(f"allow-list entry {pair} of tests/test_import_floors.py is no longer needed: delete it",
                      stacklevel=1)


# --- the checker itself, on a planted tree -------------------------------------------------------------
DOC = """# pkg

## Floors (each imports only from below)

```
app.py, __init__.py  the command, the package's names
lib/, other.py       the library, two peers
util.py              the bottom
```
"""


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


CLEAN = {"app.py": "from .lib import core\nimport pkg.other\n", "lib/__init__.py": "",
         "lib/core.py": "from ..util import helper\nfrom . import more\n", "lib/more.py": "",
         "other.py": "from pkg.util import helper\n", "util.py": "def helper(): ...\n"}


def test_a_clean_tree_passes(tmp_path):
    assert check(plant(tmp_path, CLEAN), DOC) == []


def test_a_planted_upward_import_is_named(tmp_path):
    files = {**CLEAN, "util.py": "def helper():\n    from .lib.core import thing  # upward, inside a function\n"}
    problems = check(plant(tmp_path, files), DOC)
    assert problems == ["pkg.util (line 2) imports pkg.lib.core: 'lib/' is a floor above 'util.py'"]


def test_type_checking_and_relative_imports_count(tmp_path):
    files = {**CLEAN, "lib/more.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..app import x\n"}
    problems = check(plant(tmp_path, files), DOC)
    assert problems == ["pkg.lib.more (line 3) imports pkg.app: 'app.py' is a floor above 'lib/'"]


def test_peers_do_not_import_each_other_and_every_module_has_a_floor(tmp_path):
    files = {**CLEAN, "other.py": "import pkg.lib.more\n", "stray.py": ""}
    problems = check(plant(tmp_path, files), DOC)
    assert problems == ["pkg.other (line 1) imports pkg.lib.more: 'lib/' is another entry of the same floor "
                        "'other.py'", "pkg.stray (stray.py) is on no floor of the Floors section"]


def test_allow_list_and_doc_drift(tmp_path):
    files = {**CLEAN, "util.py": "import pkg.app\n"}
    doc = DOC.replace("util.py  ", "util.py, gone/")
    allowed = {("pkg.util", "pkg.app"): "planted", ("pkg.other", "pkg.app"): "stale"}
    package = plant(tmp_path, files)
    assert check(package, doc, allowed) == ["floor entry 'gone/' names no module under pkg/"]
    assert stale(package, allowed) == [("pkg.other", "pkg.app")]
    assert check(package, doc) == ["floor entry 'gone/' names no module under pkg/",
                                   "pkg.util (line 1) imports pkg.app: 'app.py' is a floor above 'util.py'"]


def test_a_module_entry_is_more_specific_than_its_package(tmp_path):
    files = {**CLEAN, "lib/base.py": "", "util.py": "from .lib.base import x\n"}
    doc = DOC.replace("util.py              the bottom", "util.py              the bottom\nlib/base.py  below it all")
    assert check(plant(tmp_path, files), doc) == []
