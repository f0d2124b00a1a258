"""lucidlm's own layout, for models no Hugging Face family describes (e.g. a config with gated
attention or a post-norm block): config.json holds the ModelConfig, tensors keep our names."""

from __future__ import annotations

from ..config import ModelConfig
from .errors import CheckpointError
from .family import Family


def native_config(hf: dict) -> ModelConfig:
    if "lucidlm_config" not in hf:
        raise CheckpointError("config.json of model_type 'lucidlm' lacks the 'lucidlm_config' field")
    try:
        return ModelConfig.from_dict(hf["lucidlm_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: invalid lucidlm_config ({e})") from e


def native_hf_config(cfg: ModelConfig) -> dict:
    return {"model_type": "lucidlm", "lucidlm_config": cfg.to_dict()}


FAMILIES = [Family(("lucidlm",), native_config, native_hf_config, renames=[(r"(.*)", r"\1")])]
