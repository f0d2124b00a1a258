"""A reward model: a causal LM with a scalar head, trained on preference pairs with the Bradley–Terry loss.

    tokens ─▶ the LM's blocks ─▶ final norm ─▶ h at the last real token ─▶ Linear(dim, 1) ─▶ reward r

RLHF's second stage (Ouyang et al. 2022): for a prompt x with a preferred response y_c and a rejected one y_r,
P(y_c ≻ y_r) = σ(r(x, y_c) − r(x, y_r)) (Bradley & Terry 1952), so the loss is −log σ(r_c − r_r − m), with an
optional per-pair margin m (Llama 2: how much better the chosen one is). The head reads the last non-padding
token, as transformers' ``*ForSequenceClassification`` and TRL's RewardTrainer do, so left and right padding
give the same reward. The head has no bias: r_c − r_r cancels it, so nothing would train it.

The base model stays frozen (only the head trains) or trains LoRA adapters (model/lora.py); its own weights
never change, so a reward model is small, and is saved like a probe: a directory with reward_config.json (the
shape and identity of the base model it was trained on, checked at load; where that model was) +
reward_head.safetensors (+ a PEFT adapter when it trained LoRA).

Preference rows are ``{"prompt", "chosen", "rejected"}`` (sft_data.PreferenceDataset), plus an optional number
``margin``. Training goes through the Trainer with ``BradleyTerry`` as its objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..atomic_io import atomic_write
from ..checkpoint.errors import CheckpointError
from ..checkpoint.safetensors_io import read_small_tensors
from ..jsonl import DataError, read_json, write_json
from ..model.identity import config_differs, model_identity, same_fingerprint
from ..model.transformer import Transformer
from .dpo import stack_pairs
from .objectives import LossParts
from .sft_data import Example, PreferenceDataset

CONFIG_FILE, HEAD_FILE = "reward_config.json", "reward_head.safetensors"


class RewardModelError(ValueError):
    """A reward model directory that cannot be used (as asked, or with this base model); names the file."""


# --- the model --------------------------------------------------------------------------------------
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) position of each row's last real token (mask (batch, seq), 1 = real), whatever the padding side."""
    if not attention_mask.any(-1).all():
        raise ValueError("a row of the batch has no real token (its attention_mask is all 0)")
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class RewardModel(nn.Module):
    """``base`` (a lucidlm Transformer, frozen unless it carries LoRA layers) + a scalar head."""

    def __init__(self, base: Transformer, head: nn.Linear | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        if getattr(base, "lora_config", None) is None:  # head only; with LoRA, apply_lora froze all but A and B
            for p in base.parameters():
                p.requires_grad_(False)
        dim = base.config.dim
        if head is None:
            head = nn.Linear(dim, 1, bias=False)
            with torch.no_grad():  # transformers' score-head init: N(0, initializer_range)
                head.weight.copy_(torch.randn(1, dim, generator=generator) * base.config.init_std)
        if tuple(head.weight.shape) != (1, dim) or head.bias is not None:
            raise ValueError(f"the reward head must be Linear({dim}, 1) without bias, got {head}")
        self.head = head.to(next(base.parameters()).device)

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch,) float32 rewards of token rows (batch, seq)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n = self.base.config.n_layers
        # last_only: the LM head projects one position, not all; the blocks' output comes as hidden_states[n − 1]
        out = self.base.forward_outputs(input_ids, attention_mask, hidden_layers=[n - 1], last_only=True)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        h = out.hidden_states[n - 1][rows, last_token_index(attention_mask)]  # (batch, dim)
        h = self.base.norm(h)  # what the LM head reads
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


# --- the loss and the trainer's objective ---------------------------------------------------------------
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) −log σ(r_chosen − r_rejected − margin) for rewards (n,) and an optional margin (n,)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must be (n,) of one shape, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    diff = chosen - rejected
    return -F.logsigmoid(diff if margin is None else diff - margin.to(diff))


class BradleyTerry:
    """The Trainer's objective on batches of chosen_* / rejected_* rows (+ ``margin``): the loss summed over pairs,
    which the trainer divides by the step's pairs (``count``)."""

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        n = self.count(batch)
        ids, mask, _ = stack_pairs(batch)  # chosen and rejected in one forward: (2n, seq)
        rewards = model(ids, mask)
        chosen, rejected = rewards[:n], rewards[n:]
        losses = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        diff = (chosen - rejected).detach()
        metrics = {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean()),
                   "chosen_reward": float(chosen.detach().mean()), "rejected_reward": float(rejected.detach().mean())}
        return LossParts(losses.sum(), n, None, metrics)


class RewardPairDataset(PreferenceDataset):
    """Preference rows as PreferenceDataset reads them, with an optional number ``margin`` per row (0 when absent)."""

    def parse(self, row: dict) -> tuple[Example, Example, float]:
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
            raise DataError(f"field 'margin' must be a finite number, got {margin!r}")
        chosen, rejected = super().parse(row)
        return chosen, rejected, float(margin)

    def collate(self, items: list[tuple[Example, Example, float]]) -> dict[str, torch.Tensor]:
        batch = super().collate([(c, r) for c, r, _ in items])
        return {**batch, "margin": torch.tensor([m for _, _, m in items])}


# --- pairwise accuracy ----------------------------------------------------------------------------
@torch.no_grad()
def pair_rewards(model: RewardModel, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards (n,), rejected rewards (n,)) over every pair of ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for batch in batches:
        n = BradleyTerry.count(batch)
        ids, mask, _ = stack_pairs(batch)
        rewards = model(ids.to(device), mask.to(device)).cpu()
        chosen.append(rewards[:n])
        rejected.append(rewards[n:])
    if not chosen:
        raise ValueError("no preference pairs to score")
    return torch.cat(chosen), torch.cat(rejected)


def accuracy_ci(chosen: torch.Tensor, rejected: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Pairwise accuracy (a tie counts one half) and its percentile bootstrap interval over pairs."""
    if chosen.numel() == 0 or chosen.shape != rejected.shape:
        raise ValueError(f"need two (n,) reward tensors of one shape, n >= 1; got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    correct = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, 2**22 // len(correct))  # resamples drawn a few million indices at a time
    means = torch.cat([correct[torch.randint(0, len(correct), (min(chunk, n_boot - i), len(correct)), generator=g)]
                       .mean(-1) for i in range(0, n_boot, chunk)])
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    return {"accuracy": float(correct.mean()), "lo": float(lo), "hi": float(hi), "pairs": len(correct),
            "mean_margin": float((chosen - rejected).mean())}


# --- the reward model directory --------------------------------------------------------------------
@dataclass
class RewardConfig:
    hidden_size: int
    n_layers: int
    model_identity: dict  # model/identity.py's identity of the base model it was trained on
    has_adapter: bool = False  # a PEFT LoRA adapter in the directory
    base_model: str | None = None  # where the base model was loaded from (what `lucidlm reward eval` loads)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.model_identity, dict) or not isinstance(self.has_adapter, bool) \
                or not isinstance(self.base_model, str | None):
            raise ValueError("model_identity must be an object, has_adapter true/false and base_model a string or null")


def save_reward_model(model: RewardModel, directory: str | Path, family=None, base_model: str | None = None) -> Path:
    """Write the head, the config (the base model's shape and identity) and, when the base carries LoRA layers,
    its PEFT adapter; every file atomically."""
    directory = Path(directory)
    head = {"weight": model.head.weight.detach().contiguous().cpu()}
    if not torch.isfinite(head["weight"].float()).all():
        raise RewardModelError(f"{directory / HEAD_FILE}: the reward head holds NaN or inf (the training diverged)")
    directory.mkdir(parents=True, exist_ok=True)
    has_adapter = getattr(model.base, "lora_config", None) is not None
    if has_adapter:
        from ..checkpoint.peft_adapter import save_adapter

        save_adapter(model.base, family, directory, base_model)
    with atomic_write(directory / HEAD_FILE) as tmp:
        save_file(head, str(tmp))
    config = RewardConfig(model.config.dim, model.config.n_layers, model_identity(model.base), has_adapter, base_model)
    write_json(directory / CONFIG_FILE, asdict(config))
    return directory


def read_reward_config(directory: str | Path) -> RewardConfig:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a reward model directory)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise RewardModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return RewardConfig(**data)
    except (TypeError, ValueError) as e:
        raise RewardModelError(f"{path}: {e}") from None


def load_reward_model(directory: str | Path, base: Transformer, family=None) -> RewardModel:
    """The reward model in ``directory`` on ``base`` (the model it was trained on, as loaded from its checkpoint):
    shape and identity checked, then the head read and the LoRA adapter (if any) applied."""
    directory = Path(directory)
    config = read_reward_config(directory)
    where = directory / CONFIG_FILE
    if (base.config.dim, base.config.n_layers) != (config.hidden_size, config.n_layers):
        raise RewardModelError(f"{where}: made for a model with hidden size {config.hidden_size} and {config.n_layers} "
                               f"layers; this one has {base.config.dim} and {base.config.n_layers}")
    mine = model_identity(base)
    if config_differs(config.model_identity, mine) or not same_fingerprint(config.model_identity, mine):
        raise RewardModelError(f"{where}: made for another base model (its config hash or embedding fingerprint "
                               f"differs from this one's); load {config.base_model or 'the model it was trained on'}")
    head = _read_head(directory, config.hidden_size)
    if config.has_adapter:
        from ..checkpoint.peft_adapter import load_adapter

        load_adapter(base, family, directory)
    return RewardModel(base, head).eval()


def fill_reward_model(model: RewardModel, directory: str | Path, family=None) -> None:
    """Load a checkpoint's head (and LoRA weights) into a reward model of the same layout (the trainer's resume)."""
    directory = Path(directory)
    with torch.no_grad():
        model.head.weight.copy_(_read_head(directory, model.config.dim).weight)
    if getattr(model.base, "lora_config", None) is not None:
        from ..checkpoint.peft_adapter import fill_adapter

        fill_adapter(model.base, family, directory)


def _read_head(directory: Path, dim: int) -> nn.Linear:
    if not (directory / HEAD_FILE).is_file():
        raise RewardModelError(f"{directory / HEAD_FILE}: missing (a reward model directory holds {CONFIG_FILE} and "
                               f"{HEAD_FILE})")
    try:
        state = read_small_tensors(directory, HEAD_FILE, {"weight": (1, dim)})
    except CheckpointError as e:
        raise RewardModelError(f"reward head {e}") from None
    head = nn.Linear(dim, 1, bias=False)
    head.load_state_dict(state)
    return head
