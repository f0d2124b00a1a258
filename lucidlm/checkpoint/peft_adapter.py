"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

PEFT names each adapter tensor after the transformers module it wraps:
``base_model.model.<transformers module>.lora_A.weight`` (and ``lora_B``). The transformers module of a
lucidlm layer comes from the checkpoint family's rename rule for that layer's weight, so an adapter
saved here loads with ``PeftModel.from_pretrained`` onto the transformers model, and a PEFT-made
adapter loads here. Layers whose checkpoint tensor is not a plain rename (fused or permuted weights)
cannot carry a PEFT adapter and are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.lora import LoRAConfig, apply_lora, lora_layers, lora_targets
from ..model.transformer import Transformer
from .errors import CheckpointError
from .family import Family, same
from .safetensors_io import atomic_write, write_json

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


def _their_module(model: Transformer, family: Family, ours: str) -> str:
    """The transformers module name of our Linear ``ours`` (blocks.0.attn.q_proj -> model.layers.0.self_attn.q_proj)."""
    weight = ours + ".weight"
    for rule in family.rules(model.config, [weight]):
        if rule.ours == (weight,) and len(rule.theirs) == 1 and rule.to_theirs is same:
            return rule.theirs[0].removesuffix(".weight")
    raise CheckpointError(f"{family.model_types[0]}: {ours} is stored fused or transformed in this checkpoint "
                          "layout, so it cannot carry a PEFT adapter")


def save_adapter(model: Transformer, family: Family, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the model's LoRA layers (see ``apply_lora``) as a PEFT adapter, each file atomically."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA layers to save (apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in lora_layers(model):
        module = _their_module(model, family, name.removesuffix(".base_layer"))
        for ab in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{module}.{ab}.weight"] = getattr(layer, ab).weight.detach().contiguous().cpu()
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": sorted(config.target_modules), "bias": "none",
        "layers_to_transform": config.layers, "layers_pattern": "layers" if config.layers is not None else None,
        "use_rslora": config.use_rslora, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
    })
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, unsupported in (("bias", "none"), ("fan_in_fan_out", False), ("use_dora", False)):
        if cfg.get(key, unsupported) != unsupported:
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (only {unsupported!r})")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"{path}: modules_to_save={cfg['modules_to_save']} is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: target_modules as a regex ({targets!r}) is not supported; list the names")
    layers = cfg.get("layers_to_transform")
    return LoRAConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0)),
                      target_modules=tuple(targets), layers=[layers] if isinstance(layers, int) else layers,
                      use_rslora=bool(cfg.get("use_rslora", False)))


def load_adapter(model: Transformer, family: Family, directory: str | Path) -> Transformer:
    """Apply the PEFT adapter in ``directory`` to ``model`` (wraps its layers, then fills A and B).
    Every name and shape is checked before the model changes."""
    config = read_adapter_config(directory)
    expected, tensors = _adapter_tensors(model, family, Path(directory), config)
    apply_lora(model, config)
    _fill(model, expected, tensors)
    return model


def fill_adapter(model: Transformer, family: Family, directory: str | Path) -> None:
    """Load A and B from ``directory`` into a model that already carries the same LoRA layers (resume)."""
    config: LoRAConfig = model.lora_config
    expected, tensors = _adapter_tensors(model, family, Path(directory), config, wrapped=True)
    _fill(model, expected, tensors)


def _adapter_tensors(model: Transformer, family: Family, directory: Path, config: LoRAConfig, wrapped: bool = False):
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    if wrapped:
        targets = [name.removesuffix(".base_layer") for name, _ in lora_layers(model)]
    else:
        targets = lora_targets(model, config)
    with safe_open(str(weights), framework="pt") as f:
        stored = {k.replace(".default.", "."): k for k in f.keys()}  # some PEFT versions keep the adapter name
        expected = {f"{PREFIX}{_their_module(model, family, ours)}.{ab}.weight": (ours, ab)
                    for ours in targets for ab in ("lora_A", "lora_B")}
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{weights}: adapter tensors do not match the model: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")
        tensors = {key: f.get_tensor(stored[key]) for key in expected}
    for key, (ours, ab) in expected.items():
        base = model.get_submodule(ours)
        base = base.base_layer if wrapped else base
        shape = (config.r, base.in_features) if ab == "lora_A" else (base.out_features, config.r)
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{weights}: {key} has shape {list(tensors[key].shape)}, the model needs "
                                  f"{list(shape)}")
    return expected, tensors


def _fill(model: Transformer, expected: dict, tensors: dict) -> None:
    with torch.no_grad():
        for key, (ours, ab) in expected.items():
            getattr(model.get_submodule(ours), ab).weight.copy_(tensors[key])
