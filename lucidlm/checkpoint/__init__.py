"""Hugging Face checkpoints <-> lucidlm: one small mapping per family, one lazy loader."""

from .errors import CheckpointError
from .gguf import find_gguf, open_gguf
from .loader import FAMILIES, SUPPORTED_MODEL_TYPES, Loaded, load_model, read_hf_config, save_model
from .local_models import LOCAL_MODELS, local_model_file, resolve_model_path

__all__ = ["CheckpointError", "FAMILIES", "LOCAL_MODELS", "SUPPORTED_MODEL_TYPES", "Loaded", "find_gguf",
           "load_model", "local_model_file", "open_gguf", "read_hf_config", "resolve_model_path", "save_model"]
