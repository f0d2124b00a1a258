"""The probe: a linear head on the residual stream after decoder block L, scoring every token from the forward
pass that gives the logits.

    input ids ─▶ blocks 0..L ─(residual stream h after block L: hidden_layers=[L])─▶ ... ─▶ LM logits
                                   └─▶ Linear(hidden, 1) ─▶ sigmoid ─▶ score per token

One pass, never a second: the model's forward hands out h_L with the logits (``hidden_layers``,
model/transformer.py) and ``score_tokens`` scores it. That is how a text is scored (api.LM.token_scores,
probe/features.extract, probe/train.py) and how generation scores each token as it goes
(generate/engine.py's ProbeScoring, for lm.generate and the server alike).

Alignment (``ProbeConfig.alignment``): which position's hidden state scores token t.
- "own": h[t], the state computed when token t is fed in — what the reference code of Obeso et al.
  does (labels on the span's own positions). During generation that state comes from the decode
  forward that consumes the token, one step after the token was sampled, so its score arrives one
  step late (and the last token needs that one more forward); never a second pass over the text.
- "predictive": h[t − 1], the state that decoded token t: the score arrives with the token itself.
  Position 0 (nothing predicted it) gets no score (NaN). Probe directories written before the field
  existed are predictive.

A probe's shape and identity are checked on lucidlm models (``model.blocks``) and on transformers causal
LMs (decoder blocks at ``model.model.layers``). A probe is saved as a directory: probe_config.json +
probe_head.safetensors (+ a PEFT-format adapter when the probe trained LoRA on layers ≤ L).

probe_config.json records the identity of the model the probe was made for (``model_identity``, in
model/identity.py): a hash of its lucidlm config and a fingerprint of its embedding matrix, so that a probe is
refused on another model of the same shape, where it would score silently and meaninglessly. Probes written
before the field existed load with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic_io import atomic_write
from ..checkpoint.errors import CheckpointError
from ..checkpoint.safetensors_io import read_small_tensors
from ..jsonl import read_json, write_json
from ..model.identity import config_differs, model_identity, same_fingerprint

CONFIG_FILE, HEAD_FILE = "probe_config.json", "probe_head.safetensors"
QUESTION_FILE = "question_probe.json"  # marks a question probe (question_probe.py): it scores prompts, not tokens
Alignment = Literal["own", "predictive"]
ALIGNMENTS = ("own", "predictive")


class ProbeError(ValueError):
    """A probe directory that cannot be used (as asked, or with this model); the message names the file."""


@dataclass
class ProbeConfig:
    layer: int  # block whose output (residual stream) is probed, 0-based
    hidden_size: int
    n_layers: int  # blocks of the model it was made for (a probe only fits models of that shape)
    has_adapter: bool = False  # a LoRA adapter (PEFT format) in the probe directory
    alignment: Alignment = "predictive"  # token t scored from h[t] ("own") or h[t − 1] ("predictive")
    model_identity: dict | None = None  # model_identity() of the model it was made for (None: not recorded)

    def __post_init__(self) -> None:
        for name in ("layer", "hidden_size", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"probe {name} must be an integer, got {value!r}")
        if self.hidden_size < 1 or self.n_layers < 1:
            raise ValueError(f"probe hidden_size and n_layers must be >= 1, got {self.hidden_size}, {self.n_layers}")
        if not 0 <= self.layer < self.n_layers:
            raise ValueError(f"probe layer {self.layer} out of range for a model of {self.n_layers} blocks")
        if not isinstance(self.has_adapter, bool) or not isinstance(self.model_identity, dict | None):
            raise ValueError("probe has_adapter must be true/false and model_identity an object or null")
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


def check_identity(saved: dict | None, model: nn.Module, where: Path) -> None:
    """Refuse a probe made for another model; a probe without a recorded identity only warns."""
    if saved is None:
        warnings.warn(f"{where}: no model_identity recorded (an older lucidlm, or save_probe without the model): "
                      "cannot check that this probe was made for this model", stacklevel=3)
        return
    mine = model_identity(model)
    if config_differs(saved, mine):
        raise ProbeError(f"{where}: this probe was made for another model (its config hash "
                         f"{saved['config_sha256'][:12]}… differs from this model's {mine['config_sha256'][:12]}…)")
    if not same_fingerprint(saved, mine):
        raise ProbeError(f"{where}: this probe was made for another model of the same shape (the embedding "
                         "matrix differs); load the model it was trained on, or train a probe for this one")


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


def check_fits(config: ProbeConfig, model: nn.Module, directory: str | Path) -> None:
    """A probe (token or question) made for ``model``: its shape, then its recorded identity."""
    config.check_model(hidden_size_of(model), len(decoder_blocks(model)))
    check_identity(config.model_identity, model, Path(directory) / CONFIG_FILE)


def attach_probe(model: nn.Module, directory: str | Path, family=None) -> LoadedProbe:
    """Load the probe in ``directory`` for ``model``: shape checked first, then its LoRA adapter (if any)
    applied to the model, and the head moved to the model's device."""
    head, config = load_probe(directory)
    check_fits(config, model, directory)
    if config.has_adapter:
        from ..checkpoint.peft_adapter import load_adapter

        load_adapter(model, family, directory)
        model.eval()
    return LoadedProbe(head.to(next(model.parameters()).device), config)


def save_probe(directory: str | Path, head: ProbeHead, config: ProbeConfig, model: nn.Module | None = None,
               family=None) -> Path:
    """The head and config; with ``model``, its identity (checked at load), and when it carries LoRA layers
    (a LoRA probe) its PEFT adapter."""
    directory = Path(directory)
    _check_finite(head.state_dict(), directory / HEAD_FILE)  # a diverged head is an error now, not a silent NaN later
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        config = ProbeConfig(**{**asdict(config), "model_identity": model_identity(model)})
    if model is not None and getattr(model, "lora_config", None) is not None:
        from ..checkpoint.peft_adapter import save_adapter

        save_adapter(model, family, directory)
        config = ProbeConfig(**{**asdict(config), "has_adapter": True})
    with atomic_write(directory / HEAD_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp))
    write_json(directory / CONFIG_FILE, asdict(config))
    return directory


def load_probe(directory: str | Path, question: bool = False) -> tuple[ProbeHead, ProbeConfig]:
    """Head and config of a probe directory; every failure names the directory or file at fault. ``question``:
    a question probe (question_probe.py) is wanted, else a token probe; the other kind is refused."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such probe directory")
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a probe directory)")
    if (directory / QUESTION_FILE).is_file() != question:
        raise ProbeError(f"{directory}: a question probe (it scores a prompt's last token: `lucidlm probe question`), "
                         "not a token probe" if not question else
                         f"{directory}: a token probe, not a question probe (no {QUESTION_FILE}: `lucidlm probe "
                         "question` writes one)")
    data = read_json(path)  # malformed or deeply nested JSON: an error naming the file
    if not isinstance(data, dict):
        raise ProbeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        config = ProbeConfig(**data)
    except (TypeError, ValueError) as e:
        raise ProbeError(f"{path}: {e}") from None
    return _read_head(directory, config.hidden_size), config


def _read_head(directory: Path, hidden_size: int) -> ProbeHead:
    if not (directory / HEAD_FILE).is_file():
        raise ProbeError(f"{directory / HEAD_FILE}: missing (a probe directory holds {CONFIG_FILE} and {HEAD_FILE})")
    try:
        state = read_small_tensors(directory, HEAD_FILE, {"linear.weight": (1, hidden_size), "linear.bias": (1,)})
    except CheckpointError as e:
        raise ProbeError(f"probe head {e}; retrain it (diverged: a lower learning rate, a larger l2)") from None
    head = ProbeHead(hidden_size)
    head.load_state_dict(state)
    return head.eval()


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in state.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise ProbeError(f"{path}: probe head has non-finite weights ({', '.join(bad)} hold NaN or inf), so it "
                         "cannot score anything; retrain it (a lower learning rate, or a larger l2)")
