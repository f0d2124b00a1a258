"""Hugging Face checkpoints <-> lucidlm: one small mapping per family, one lazy loader."""

from .errors import CheckpointError
from .loader import FAMILIES, SUPPORTED_MODEL_TYPES, Loaded, load_model, read_hf_config, save_model

__all__ = ["CheckpointError", "FAMILIES", "SUPPORTED_MODEL_TYPES", "Loaded", "load_model", "read_hf_config",
           "save_model"]
