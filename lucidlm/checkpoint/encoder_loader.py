"""Load a Hugging Face encoder checkpoint (``model_type: bert``) into a lucidlm ``MaskedLM``, and save one back.

The same steps as ``loader.load_model`` for the causal LMs: config.json → ``EncoderConfig``, the model built on
the meta device, every expected tensor checked against the safetensors headers (missing, unexpected,
mis-shaped: all before any data is read), then tensors read lazily, cast and assigned. Saving writes the bert
layout that transformers' ``BertForMaskedLM.from_pretrained`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..model.encoder import EncoderConfig, MaskedLM
from . import bert
from .errors import CheckpointError
from .family import Family
from .files import has_file, read_json
from .loader import _check, check_token_ids, resolve_dtype, save_model
from .safetensors_io import SafetensorsReader

ENCODER_FAMILIES: dict[str, Family] = {kind: fam for fam in bert.FAMILIES for kind in fam.model_types}
TIED_DECODER = r"cls\.predictions\.decoder\.weight"  # a tied checkpoint's copy of the word embeddings


@dataclass
class LoadedEncoder:
    model: MaskedLM
    config: EncoderConfig
    family: Family
    hf_config: dict


def read_encoder_config(directory: str | Path) -> tuple[dict, Family, EncoderConfig]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not has_file(directory, "config.json"):
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    hf = read_json(directory, "config.json")
    kind = hf.get("model_type")
    if kind not in ENCODER_FAMILIES:
        raise CheckpointError(f"{directory / 'config.json'}: model_type {kind!r} is not an encoder lucidlm loads; "
                              f"supported encoder model types: {', '.join(sorted(ENCODER_FAMILIES))} "
                              "(causal LMs load with lucidlm.load)")
    family = ENCODER_FAMILIES[kind]
    try:
        cfg = family.to_config(hf)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
        raise CheckpointError(f"{directory / 'config.json'}: cannot read a {kind} config "
                              f"({type(e).__name__}: {e})") from e
    check_token_ids(hf, cfg.vocab_size, directory / "config.json")
    return hf, family, cfg


def load_encoder_model(directory: str | Path, dtype: str | torch.dtype | None = "float32",
                       device: str | torch.device = "cpu") -> LoadedEncoder:
    """A ``MaskedLM`` in eval mode from a checkpoint directory (config.json + safetensors)."""
    hf, family, cfg = read_encoder_config(directory)
    torch_dtype = resolve_dtype(dtype, cfg)  # "auto": cfg.dtype
    reader = SafetensorsReader(directory)
    with torch.device("meta"):
        model = MaskedLM(cfg)
    ours = dict(model.state_dict(keep_vars=True))
    rules = family.rules(cfg, list(ours))
    checked = replace(family, ignored=(*family.ignored, TIED_DECODER)) if cfg.tie_embeddings else family
    _check(reader, rules, ours, checked, tied=False)
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        for name, t in zip(rule.ours, rule.to_ours([reader.get(n) for n in rule.theirs])):
            state[name] = t.to(device=device, dtype=torch_dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return LoadedEncoder(model, cfg, family, hf)


def save_encoder_model(model: MaskedLM, directory: str | Path, hf_config: dict | None = None,
                       source: str | Path | None = None) -> Path:
    """config.json + safetensors in the bert layout (``hf_config``: the loaded config.json to keep), tokenizer
    files copied from ``source``. The tensors go through ``loader.save_model`` with the bert family's rules."""
    return save_model(model, directory, ENCODER_FAMILIES["bert"], hf_config, source)
