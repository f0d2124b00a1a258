"""Bottleneck adapters on disk, in lucidlm's own format (PEFT has no Houlsby adapter type; AdapterHub's
``adapters`` library has one, but pickles its weights and names them after transformers' BERT modules).

A directory of two files:

    bottleneck_adapter_config.json    {"format": "lucidlm-bottleneck-adapter", "format_version": 1, "size": m,
                                       "activation", "places", "layers", "train_norms", "hidden_size",
                                       "base_model_name_or_path"}
    bottleneck_adapter.safetensors    blocks.<i>.<attn|mlp>_adapter.<down|up>.<weight|bias>
                                      (+ every norm's tensors under the model's own names, with train_norms)

Names are lucidlm's module paths, the same for every checkpoint family. Reading follows peft_adapter.py's
rules: the files are found through checkpoint/files.py (no symlink or name leads outside the directory), only
JSON and safetensors are read (nothing executes), and the config, every tensor name, dtype and shape are
checked against the model before it changes; each error names the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic_io import atomic_write
from ..jsonl import write_json
from ..model.bottleneck_adapter import BottleneckConfig, adapter_state_dict, apply_bottleneck, expected_shapes
from ..model.bottleneck_adapter import check_config as check_bottleneck_config
from ..model.transformer import Transformer
from .errors import CheckpointError
from .files import has_file, read_json
from .safetensors_io import SafetensorsReader, require_float

CONFIG_FILE, WEIGHTS_FILE = "bottleneck_adapter_config.json", "bottleneck_adapter.safetensors"
FORMAT, FORMAT_VERSION = "lucidlm-bottleneck-adapter", 1
CONFIG_KEYS = {"format", "format_version", "size", "activation", "places", "layers", "train_norms", "hidden_size",
               "base_model_name_or_path"}


def is_bottleneck_adapter(directory: str | Path) -> bool:
    return has_file(directory, CONFIG_FILE)


def save_bottleneck_adapter(model: Transformer, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the model's bottleneck adapters (see ``apply_bottleneck``), each file atomically."""
    config: BottleneckConfig | None = getattr(model, "bottleneck_config", None)
    if config is None:
        raise ValueError("the model has no bottleneck adapters to save (apply_bottleneck first)")
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "size": config.size, "activation": config.activation,
        "places": list(config.places), "layers": config.layers, "train_norms": config.train_norms,
        "hidden_size": model.config.dim, "base_model_name_or_path": base_model,
    })
    return directory


def read_bottleneck_config(directory: str | Path) -> tuple[BottleneckConfig, int]:
    """(the adapter's config, the hidden size it was made for); anything unknown or malformed is refused by name."""
    path = Path(directory) / CONFIG_FILE
    if not has_file(directory, CONFIG_FILE):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a lucidlm bottleneck adapter directory)")
    cfg = read_json(directory, CONFIG_FILE)
    if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {cfg.get('format')!r} version {cfg.get('format_version')!r}; "
                              f"only {FORMAT!r} version {FORMAT_VERSION} is read")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {unknown}; known: {sorted(CONFIG_KEYS)}")
    places, layers, hidden = cfg.get("places"), cfg.get("layers"), cfg.get("hidden_size")
    if not isinstance(places, list) or not all(isinstance(p, str) for p in places):
        raise CheckpointError(f"{path}: places={places!r} must be a list of names")
    if layers is not None and (not isinstance(layers, list) or not all(type(i) is int for i in layers)):
        raise CheckpointError(f"{path}: layers={layers!r} must be a list of block indices or null")
    if type(hidden) is not int:
        raise CheckpointError(f"{path}: hidden_size={hidden!r} must be an integer")
    config = BottleneckConfig(size=cfg.get("size"), activation=cfg.get("activation"), places=tuple(places),
                              layers=layers, train_norms=cfg.get("train_norms"))
    try:
        config.validate()
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, hidden


def load_bottleneck_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Apply the adapter in ``directory`` to ``model``; every check passes before the model changes."""
    path = Path(directory)
    config, hidden = read_bottleneck_config(path)
    if hidden != model.config.dim:
        raise CheckpointError(f"{path / CONFIG_FILE}: made for hidden size {hidden}, the model's is {model.config.dim}")
    try:
        check_bottleneck_config(model, config)
    except ValueError as e:  # layers this model does not have, an adapter already there
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    tensors = _read_tensors(model, config, path)
    apply_bottleneck(model, config)
    _fill(model, tensors)
    return model


def fill_bottleneck_adapter(model: Transformer, directory: str | Path) -> None:
    """Load the tensors of ``directory`` into a model that already carries the same adapters (resume)."""
    _fill(model, _read_tensors(model, model.bottleneck_config, Path(directory)))


def _read_tensors(model: Transformer, config: BottleneckConfig, directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_FILE
    if not has_file(directory, WEIGHTS_FILE):
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    expected = expected_shapes(model, config)
    reader = SafetensorsReader(directory, single=WEIGHTS_FILE, index=None)
    missing, unexpected = sorted(set(expected) - set(reader.tensors)), sorted(set(reader.tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: adapter tensors do not match the model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    require_float(reader.tensors, list(expected))
    for name, shape in expected.items():
        if reader.tensors[name].shape != shape:
            raise CheckpointError(f"{weights}: {name} has shape {list(reader.tensors[name].shape)}, the model needs "
                                  f"{list(shape)}")
    return {name: reader.get(name) for name in expected}


def _fill(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
