"""The public surface: ``lm = lucidlm.load(path)`` and the ``LM`` object it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model, save_model
from .checkpoint.family import Family
from .config import ModelConfig
from .device import resolve_device
from .model.transformer import Transformer
from .tokenizer import Tokenizer


@dataclass
class LM:
    """A loaded model: the nn.Module, its tokenizer and config, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    path: Path | None = None
    family: Family | None = None
    hf_config: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok().decode(ids, skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write the model back in the checkpoint's own layout (HF families stay HF)."""
        out = save_model(self.model, directory, self.family, self.hf_config, source=self.path)
        if self.tokenizer is not None and not (Path(out) / "tokenizer.json").exists():
            self.tokenizer.save(out)
        return out

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: this checkpoint has no tokenizer.json, so text cannot be encoded")
        return self.tokenizer

    def __repr__(self) -> str:
        n = self.model.num_parameters()
        return f"LM({self.path}, {n / 1e6:.1f}M params, {self.dtype}, {self.device})"


def load(path: str | Path, dtype: str | torch.dtype | None = "float32", device: str | torch.device = "auto") -> LM:
    """Load a Hugging Face-format checkpoint directory (config.json + safetensors + tokenizer.json).

    dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's own). device: "auto"
    picks CUDA when available, else CPU.
    """
    path = Path(path)
    loaded = load_model(path, dtype=dtype, device=resolve_device(device))
    return LM(loaded.model, Tokenizer.from_dir(path), loaded.config, path, loaded.family, loaded.hf_config)
