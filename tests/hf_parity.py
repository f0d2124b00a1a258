"""Shared helpers of the parity tests: run a Hugging Face model and a lucidlm model on the same
inputs and measure how far their logits are apart."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from hf_models import build_hf_model
from transformers.utils import logging as hf_logging

from lucidlm.checkpoint import Loaded, load_model

hf_logging.disable_progress_bar()  # keeps `pytest -s` output to the parity table

ATOL = 1e-4
VOCAB = 128  # every tiny model in hf_models has this vocabulary
SEQ = 12
PAD = 3  # left padding of row 1 in the padded batch
# hf_models draws weights from N(0, 0.1): attention is then nearly uniform and moving every token to
# position 0 changes the logits by ~1e-4 (5e-5 for deepseek_v3), below ATOL, so RoPE or mask mistakes
# could pass unseen. At 0.3 attention is sharp and positions move the logits by O(1).
STD = 0.3


def random_ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padded(ids: torch.Tensor, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, position_ids) with the last row left-padded by ``pad`` tokens; the
    position ids skip the padding, as lucidlm derives them."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    ids[-1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def hf_forward(model, ids: torch.Tensor, attention_mask=None, position_ids=None, **kwargs):
    """The transformers output; position ids are passed where the model takes them (BLOOM derives
    its ALiBi offsets from the attention mask instead)."""
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None and "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = position_ids
    return model(ids, **kwargs)


def hf_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return hf_forward(model, ids, **kwargs).logits


@torch.no_grad()
def ours(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs)


@torch.no_grad()
def ours_outputs(model, ids: torch.Tensor, **kwargs):
    """lucidlm's ``forward_outputs``: logits, hidden states of ``hidden_layers``, the aux loss on request."""
    return model.forward_outputs(ids, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, what: str = "logits") -> float:
    diff = max_diff(a, b)
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol}"
    return diff


@torch.no_grad()
def random_hf_model(kind: str, seed: int = 0, std: float = STD, **overrides):
    """``build_hf_model`` with every weight (and DeepSeek-V3's router correction bias) redrawn from
    N(0, std); the same seed gives the same weights whatever the config overrides that keep shapes."""
    model = build_hf_model(kind, seed, **overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.parameters())
    tensors += [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen) * std)
    return model


def hf_checkpoint(kind: str, directory: Path, seed: int = 0, save_kwargs: dict | None = None,
                  **overrides) -> tuple[torch.nn.Module, Loaded]:
    """A random transformers model of the family (config overrides applied), saved with
    save_pretrained and loaded back by lucidlm."""
    model = random_hf_model(kind, seed, **overrides)
    model.save_pretrained(directory, **(save_kwargs or {}))
    return model, load_model(directory)
