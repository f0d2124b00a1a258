"""lucidlm: a hackable, pure-PyTorch LLM stack that knows when it is making things up."""

from .config import MLAConfig, ModelConfig, MoEConfig, RopeScaling, from_preset
from .model.transformer import ModelOutput, Transformer

__version__ = "0.1.0"

__all__ = ["MLAConfig", "ModelConfig", "ModelOutput", "MoEConfig", "RopeScaling", "Transformer", "from_preset",
           "load", "LM", "load_encoder", "EncoderLM"]


def __getattr__(name: str):
    # The API pulls in tokenizers/jinja2; import it only when asked for.
    if name in ("load", "LM", "load_encoder", "EncoderLM"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
