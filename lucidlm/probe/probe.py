"""The probe: a hook on decoder block L and a linear head that scores every token in the same forward pass.

    input ids ─▶ blocks 0..L ─(hook: residual stream h after block L)─▶ ... ─▶ LM logits
                                   └─▶ Linear(hidden, 1) ─▶ sigmoid ─▶ score per token

Alignment (``ProbeConfig.alignment``): which position's hidden state scores token t.
- "own": h[t], the state computed when token t is fed in — what the reference code of Obeso et al.
  does (labels on the span's own positions). During generation that state comes from the decode
  forward that consumes the token, one step after the token was sampled, so its score arrives one
  step late (and the last token needs that one more forward); never a second pass over the text.
- "predictive": h[t − 1], the state that decoded token t: the score arrives with the token itself.
  Position 0 (nothing predicted it) gets no score (NaN). Probe directories written before the field
  existed are predictive.

The hook works on lucidlm models (``model.blocks``) and on any transformers causal LM whose decoder
blocks are at ``model.model.layers``. A probe is saved as a directory: probe_config.json +
probe_head.safetensors (+ a PEFT-format adapter when the probe trained LoRA on layers ≤ L).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint.safetensors_io import atomic_write, write_json

CONFIG_FILE, HEAD_FILE = "probe_config.json", "probe_head.safetensors"
Alignment = Literal["own", "predictive"]
ALIGNMENTS = ("own", "predictive")


@dataclass
class ProbeConfig:
    layer: int  # block whose output (residual stream) is probed, 0-based
    hidden_size: int
    n_layers: int  # blocks of the model it was made for (a probe only fits models of that shape)
    has_adapter: bool = False  # a LoRA adapter (PEFT format) in the probe directory
    alignment: Alignment = "predictive"  # token t scored from h[t] ("own") or h[t − 1] ("predictive")

    def __post_init__(self) -> None:
        check_alignment(self.alignment)

    def check_model(self, hidden_size: int, n_layers: int) -> None:
        if (hidden_size, n_layers) != (self.hidden_size, self.n_layers):
            raise ValueError(f"this probe was made for a model with hidden size {self.hidden_size} and "
                             f"{self.n_layers} layers; this model has {hidden_size} and {n_layers}")


def check_alignment(alignment: str) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"probe alignment {alignment!r} is not one of {list(ALIGNMENTS)}")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a lucidlm model (``.blocks``) or a transformers causal LM (``.model.layers``)."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return model.blocks
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: expected .blocks (lucidlm) or "
                     ".model.layers (transformers causal LMs)")


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config
    return cfg.dim if hasattr(cfg, "dim") else cfg.hidden_size


class ProbeHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (...) raw logits (BCE-with-logits in training, sigmoid for scores)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(hidden).float())


def aligned_hidden(hidden: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """(batch, seq, dim) after block L -> (batch, seq − 1, dim): the state that scores each of tokens 1..seq−1.
    Position 0 is left out under both alignments, so both score exactly the same tokens."""
    return hidden[:, 1:] if alignment == "own" else hidden[:, :-1]


def score_tokens(head: ProbeHead, hidden: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """(batch, seq, dim) after block L -> (batch, seq) score of every token (NaN at position 0)."""
    scores = torch.full(hidden.shape[:2], float("nan"), device=hidden.device)
    scores[:, 1:] = head.scores(aligned_hidden(hidden, alignment))
    return scores


@dataclass
class LoadedProbe:
    """A probe attached to an LM (``lucidlm.load(..., probe=DIR)``)."""

    head: ProbeHead
    config: ProbeConfig


def attach_probe(model: nn.Module, directory: str | Path, family=None) -> LoadedProbe:
    """Load the probe in ``directory`` for ``model``: shape checked first, then its LoRA adapter (if any)
    applied to the model, and the head moved to the model's device."""
    head, config = load_probe(directory)
    config.check_model(hidden_size_of(model), len(decoder_blocks(model)))
    if config.has_adapter:
        from ..checkpoint.peft_adapter import load_adapter

        load_adapter(model, family, directory)
        model.eval()
    return LoadedProbe(head.to(next(model.parameters()).device), config)


@dataclass
class ProbedOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    scores: torch.Tensor  # (batch, seq): score of each token (NaN at position 0)
    hidden: torch.Tensor  # (batch, seq, hidden) after block L


class ProbedModel(nn.Module):
    """A causal LM with a probe hooked on block ``layer``: one forward gives logits and scores."""

    def __init__(self, model: nn.Module, head: ProbeHead, layer: int, alignment: Alignment = "own") -> None:
        super().__init__()
        blocks = decoder_blocks(model)
        if not 0 <= layer < len(blocks):
            raise IndexError(f"probe layer {layer} out of range for a model of {len(blocks)} blocks")
        check_alignment(alignment)
        self.model, self.head, self.layer, self.alignment = model, head, layer, alignment
        self._captured: torch.Tensor | None = None
        blocks[layer].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args, output) -> None:
        # lucidlm blocks return (x, aux_loss); transformers decoder layers a tensor or a tuple led by it
        self._captured = output[0] if isinstance(output, tuple) else output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> ProbedOutput:
        self._captured = None
        out = self.model(input_ids, attention_mask=attention_mask, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        hidden = self._captured
        return ProbedOutput(logits, score_tokens(self.head, hidden, self.alignment), hidden)


def save_probe(directory: str | Path, head: ProbeHead, config: ProbeConfig, model: nn.Module | None = None,
               family=None) -> Path:
    """The head and config; with ``model`` carrying LoRA layers (a LoRA probe), also its PEFT adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None and getattr(model, "lora_config", None) is not None:
        from ..checkpoint.peft_adapter import save_adapter

        save_adapter(model, family, directory)
        config = ProbeConfig(**{**asdict(config), "has_adapter": True})
    with atomic_write(directory / HEAD_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp))
    write_json(directory / CONFIG_FILE, asdict(config))
    return directory


def load_probe(directory: str | Path) -> tuple[ProbeHead, ProbeConfig]:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a probe directory)")
    try:
        config = ProbeConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    except TypeError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from None
    state = load_file(str(directory / HEAD_FILE))
    head = ProbeHead(config.hidden_size)
    if state.get("linear.weight", torch.empty(0)).shape != (1, config.hidden_size):
        raise ValueError(f"{directory / HEAD_FILE}: head weight does not match hidden size {config.hidden_size}")
    head.load_state_dict(state)
    return head.eval(), config
