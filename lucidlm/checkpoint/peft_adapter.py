"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

PEFT names each adapter tensor after the transformers module it wraps:
``base_model.model.<transformers module>.lora_A.weight`` (and ``lora_B``). The transformers module of a
lucidlm layer comes from the checkpoint family's rename rule for that layer's weight, so an adapter
saved here loads with ``PeftModel.from_pretrained`` onto the transformers model, and a PEFT-made
adapter loads here. Layers whose checkpoint tensor is not a plain rename (fused or permuted weights)
cannot carry a PEFT adapter and are refused by name.

Modules trained in full beside the adapters (``LoRAConfig.modules_to_save``: LongLoRA's embedding and norms) are
saved whole as PEFT does: ``base_model.model.<transformers module>.weight``, their transformers paths listed in
the config's ``modules_to_save``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic_io import atomic_write
from ..jsonl import write_json
from ..model.linear import Linear
from ..model.lora import (
    TARGETS,
    LoRAConfig,
    apply_lora,
    lora_layers,
    lora_targets,
    savable_modules,
    saved_modules,
    targeted,
)
from ..model.transformer import Transformer
from .errors import CheckpointError
from .family import Family, same
from .files import has_file, read_json
from .loader import FAMILIES
from .safetensors_io import SafetensorsReader, require_float

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."

# Model types whose attention and MLP projections are plain nn.Linear modules in transformers, tested
# against PEFT; "lucidlm" (our own layout) keeps our names, so only lucidlm reads those adapters.
PEFT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "mixtral", "qwen3_moe", "lucidlm")

# adapter_config.json options that change what the adapter computes, with the only value read here.
# (Options that only steer initialisation or training, e.g. init_lora_weights or loftq_config, are ignored.)
PLAIN_LORA = {
    "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "use_qalora": False,
    "rank_pattern": None, "alpha_pattern": None, "exclude_modules": None,
    "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "arrow_config": None, "velora_config": None, "kasa_config": None,
    "monteclora_config": None, "use_bdlora": None, "megatron_config": None,
}
# Initialisations that also rewrite the base weights (W - B A): such an adapter goes with that changed
# base, unless PEFT saved it converted to plain LoRA (then init_lora_weights reads True).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _family(family: Family | None) -> Family:
    """The family, checked to be one whose adapters PEFT can express (None: lucidlm's own layout)."""
    family = family or FAMILIES["lucidlm"]
    kind = family.model_types[0]
    if kind not in PEFT_MODEL_TYPES:
        raise CheckpointError(f"LoRA adapters are not supported yet for model type {kind!r}; "
                              f"supported: {list(PEFT_MODEL_TYPES)}")
    return family


def _is_expert(family: Family, ours: str) -> bool:
    return ".experts." in ours and family.model_types[0] != "lucidlm"


def _their_module(model: Transformer, family: Family, ours: str) -> str:
    """The transformers module name of our Linear ``ours`` (blocks.0.attn.q_proj -> model.layers.0.self_attn.q_proj)."""
    kind = family.model_types[0]
    if _is_expert(family, ours):
        raise CheckpointError(f"{kind}: {ours} is a MoE expert, which transformers stores fused (one tensor for "
                              "all experts), so PEFT cannot adapt it; target attention projections only")
    return _their_tensor(model, family, ours + ".weight").removesuffix(".weight")


def _their_tensor(model: Transformer, family: Family, ours: str) -> str:
    """The transformers name of our tensor ``ours`` where the checkpoint stores it as a plain rename."""
    for rule in family.rules(model.config, [ours]):
        if rule.ours == (ours,) and len(rule.theirs) == 1 and rule.to_theirs is same:
            return rule.theirs[0]
    raise CheckpointError(f"{family.model_types[0]}: {ours.rsplit('.', 1)[0]} is stored fused or transformed in "
                          "this checkpoint layout, so it cannot carry a PEFT adapter")


def _saved_tensors(model: Transformer, family: Family, modules: list[str]) -> dict[str, tuple[str, str]]:
    """{PEFT key: (our module, parameter name)} of the modules trained in full (modules_to_save)."""
    return {f"{PREFIX}{_their_tensor(model, family, f'{name}.{p}')}": (name, p)
            for name in modules for p, _ in model.get_submodule(name).named_parameters(recurse=False)}


def save_adapter(model: Transformer, family: Family | None, directory: str | Path,
                 base_model: str | None = None) -> Path:
    """Write the model's LoRA layers (see ``apply_lora``) as a PEFT adapter, each file atomically.
    ``family``: the checkpoint family of the base model (its rename rules give PEFT's names)."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None or not any(True for _ in lora_layers(model)):
        raise ValueError("the model has no LoRA layers to save (apply_lora first)")
    family = _family(family)
    tensors, modules = {}, []
    for name, layer in lora_layers(model):
        modules.append(_their_module(model, family, name))
        for ab in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{modules[-1]}.{ab}.weight"] = getattr(layer, ab).weight.detach().contiguous().cpu()
    saved = saved_modules(model, config)
    for key, (name, p) in _saved_tensors(model, family, saved).items():
        tensors[key] = getattr(model.get_submodule(name), p).detach().contiguous().cpu()
    their_saved = sorted({_their_tensor(model, family, f"{name}.weight").removesuffix(".weight") for name in saved})
    # Dotted targets are our paths: PEFT gets the transformers path of every adapted layer instead (as it
    # writes itself for "all-linear"), which already says which layers, so no layers_to_transform.
    short = all("." not in t for t in config.target_modules)
    targets, layers = (sorted(config.target_modules), config.layers) if short else (sorted(modules), None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": targets, "bias": "none",
        "layers_to_transform": layers, "layers_pattern": "layers" if layers is not None else None,
        "use_rslora": config.use_rslora, "fan_in_fan_out": False, "modules_to_save": their_saved or None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
    })
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """adapter_config.json as a LoRAConfig; anything lucidlm would compute differently is refused by name."""
    path = Path(directory) / CONFIG_FILE
    if not has_file(directory, CONFIG_FILE):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    cfg = read_json(directory, CONFIG_FILE)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, plain in PLAIN_LORA.items():
        if cfg.get(key) not in (plain, None, False, {}, []):
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (only {plain!r})")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise CheckpointError(f"{path}: init_lora_weights={init!r} changed the base weights, so this adapter needs "
                              "that changed base; save it with PEFT's path_initial_model_for_weight_conversion")
    if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise CheckpointError(f"{path}: layers_pattern={cfg['layers_pattern']!r} is not supported (only 'layers')")
    layers = cfg.get("layers_to_transform")
    return LoRAConfig(r=cfg.get("r", 8), alpha=float(cfg.get("lora_alpha", 8)),
                      dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=_targets(path, cfg),
                      layers=[layers] if isinstance(layers, int) else layers,
                      use_rslora=bool(cfg.get("use_rslora", False)),
                      modules_to_save=_names(path, cfg, "modules_to_save"))


def _names(path: Path, cfg: dict, key: str) -> tuple[str, ...]:
    value = cfg.get(key) or ()
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{path}: {key}={value!r} is not supported; list the module names")
    return tuple(value)


def _targets(path: Path, cfg: dict) -> tuple[str, ...]:
    targets = cfg.get("target_modules")
    if targets == "all-linear":  # PEFT: every Linear but the output layer
        return TARGETS
    if isinstance(targets, str) or not targets:
        raise CheckpointError(f"{path}: target_modules={targets!r} is not supported; list the module names")
    return tuple(targets)


def load_adapter(model: Transformer, family: Family | None, directory: str | Path) -> Transformer:
    """Apply the PEFT adapter in ``directory`` to ``model`` (wraps its layers, then fills A and B).
    Every name and shape is checked before the model changes."""
    path, family = Path(directory), _family(family)
    config = read_adapter_config(path)
    config.target_modules = _our_targets(model, family, path / CONFIG_FILE, config.target_modules)
    config.modules_to_save = _our_saved(model, family, path / CONFIG_FILE, config.modules_to_save)
    try:
        targets = lora_targets(model, config)
    except ValueError as e:  # e.g. target modules or layers this model does not have
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    expected, tensors = _adapter_tensors(model, family, path, config, targets)
    apply_lora(model, config)
    _fill(model, expected, tensors)
    return model


def _our_targets(model: Transformer, family: Family, path: Path, targets: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT's target names in ours: short names (q_proj) are the same in both; a dotted one is a tail of
    transformers module paths (model.layers.0.mlp.up_proj), replaced by our paths of those modules."""
    if all("." not in t for t in targets):
        return targets
    theirs = {_their_module(model, family, name): name for name, m in model.named_modules()
              if isinstance(m, Linear) and targeted(name, TARGETS) and not _is_expert(family, name)}
    ours: list[str] = []
    for t in targets:
        hits = [t] if "." not in t else [name for module, name in theirs.items() if targeted(module, (t,))]
        if not hits:
            raise CheckpointError(f"{path}: target module {t!r} is no adaptable layer of this model")
        ours += hits
    return tuple(ours)


def _our_saved(model: Transformer, family: Family, path: Path, theirs: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT's modules_to_save as the paths of our modules. PEFT selects every module whose name ends with an entry
    (plain ``str.endswith``: "norm" is every norm, q_norm too); lucidlm's own layout keeps LoRAConfig's rule (a
    path or a dotted tail), so that "norm" stays the final norm."""
    own = family.model_types[0] == "lucidlm"
    candidates = {}
    for name in savable_modules(model):
        try:
            candidates[_their_tensor(model, family, f"{name}.weight").removesuffix(".weight")] = name
        except CheckpointError:
            continue  # not stored as a plain rename
    ours: list[str] = []
    for t in theirs:
        hits = [name for module, name in candidates.items() if (targeted(module, (t,)) if own else module.endswith(t))]
        if not hits:
            raise CheckpointError(f"{path}: modules_to_save entry {t!r} is no embedding, norm or lm_head of this "
                                  "model that lucidlm can train in full")
        ours += [h for h in hits if h not in ours]
    return tuple(ours)


def fill_adapter(model: Transformer, family: Family | None, directory: str | Path) -> None:
    """Load A and B from ``directory`` into a model that already carries the same LoRA layers (resume)."""
    config: LoRAConfig = model.lora_config
    targets = [name for name, _ in lora_layers(model)]
    expected, tensors = _adapter_tensors(model, _family(family), Path(directory), config, targets, wrapped=True)
    _fill(model, expected, tensors)


def _adapter_tensors(model: Transformer, family: Family, directory: Path, config: LoRAConfig, targets: list[str],
                     wrapped: bool = False) -> tuple[dict[str, tuple[str, str]], dict[str, torch.Tensor]]:
    """({PEFT key: (our layer, "lora_A" | "lora_B")}, {PEFT key: tensor}) for the layers ``targets``
    (already wrapped in LoRALinear when ``wrapped``), every key and shape checked."""
    weights = directory / WEIGHTS_FILE
    if not has_file(directory, WEIGHTS_FILE):
        found = " (found adapter_model.bin: only safetensors adapters are read)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}{found}")
    expected = {f"{PREFIX}{_their_module(model, family, ours)}.{ab}.weight": (ours, ab)
                for ours in targets for ab in ("lora_A", "lora_B")}
    try:
        expected.update(_saved_tensors(model, family, saved_modules(model, config)))
    except ValueError as e:  # e.g. the embedding of a model whose embeddings are tied
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from e
    reader = SafetensorsReader(directory, single=WEIGHTS_FILE, index=None)
    stored = {k.replace(".default.", "."): k for k in reader.tensors}  # some PEFT versions keep the adapter name
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: adapter tensors do not match the model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    require_float(reader.tensors, [stored[key] for key in expected])
    tensors = {key: reader.get(stored[key]) for key in expected}
    for key, (ours, ab) in expected.items():
        base = model.get_submodule(ours)
        base = base.base_layer if wrapped and ab in ("lora_A", "lora_B") else base
        shape = (config.r, base.in_features) if ab == "lora_A" else (base.out_features, config.r) \
            if ab == "lora_B" else tuple(getattr(base, ab).shape)
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{weights}: {key} has shape {list(tensors[key].shape)}, the model needs "
                                  f"{list(shape)}")
    return expected, tensors


def _fill(model: Transformer, expected: dict[str, tuple[str, str]], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, (ours, name) in expected.items():
            target = getattr(model.get_submodule(ours), name)  # lora_A / lora_B, or a saved module's parameter
            (target.weight if name in ("lora_A", "lora_B") else target).copy_(tensors[key])
