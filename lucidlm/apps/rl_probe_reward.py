"""The hallucination probe as an RL reward: minus the riskiest response token's probe score.

    prompt ids + response ids (right-padded batch) ─forward_outputs(hidden_layers=[L])─▶ h_L
        ─score_tokens─▶ (batch, seq) scores ─response positions only─▶ max (or mean) ─▶ reward = −that

Teacher-forced: one forward per batch of rollouts scores every response token as generation with the probe
would (probe/probe.py: "own" from h[t], "predictive" from h[t − 1]; the same head, layer, alignment), so the
reward is ``probe.selective.lowest_max_score`` of the rollout. Right padding needs no care beyond the attention
mask: causal attention keeps a row's real tokens from seeing its padding.

Which model reads the response (``ProbeRewardConfig.scorer``): "frozen" (default) a copy of the model as it was
when the reward was made — the states the probe was trained on, which the policy cannot move to hide its
guesses from the probe; "policy" the model being trained, read as it is at each call.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..probe.probe import LoadedProbe, attach_probe, load_probe, score_tokens
from ..tokenizer import pad_id
from ..train.rewards import Rollout
from .rl_rewards import is_abstention


@dataclass(frozen=True)
class ProbeRewardConfig:
    reduce: Literal["max", "mean"] = "max"  # over the response's tokens
    abstain_bonus: float = 0.0  # added to a response that abstains (rl_rewards.is_abstention)
    empty: float = -1.0  # a response with no token: the worst score, so that silence is not the safest answer
    scorer: Literal["frozen", "policy"] = "frozen"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")
        if self.scorer not in ("frozen", "policy"):
            raise ValueError(f"scorer must be 'frozen' or 'policy', got {self.scorer!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class ProbeReward:
    """``Reward``: −max (or −mean) probe score over each rollout's response tokens (+ an optional abstention
    bonus). ``model`` is scored as given; ``from_directory`` makes the frozen copy."""

    name = "probe"

    def __init__(self, model: nn.Module, probe: LoadedProbe, pad: int, config: ProbeRewardConfig | None = None) -> None:
        self.model, self.probe, self.pad = model, probe, pad
        self.config = config or ProbeRewardConfig()

    @classmethod
    def from_directory(cls, lm: Any, directory: str | Path, config: ProbeRewardConfig | None = None) -> ProbeReward:
        """The probe in ``directory`` on ``lm.model`` (a frozen copy unless ``config.scorer`` is "policy"); its
        shape and model identity are checked (probe/probe.attach_probe)."""
        config = config or ProbeRewardConfig()
        model = lm.model
        if config.scorer == "frozen":
            model = copy.deepcopy(model).eval().requires_grad_(False)
        elif load_probe(directory)[1].has_adapter:
            raise ValueError(f"{directory}: a LoRA probe changes the model it is attached to; score it with "
                             "scorer='frozen', not on the policy")
        probe = attach_probe(model, directory, getattr(lm, "family", None))
        return cls(model, probe, pad_id(lm.tokenizer), config)

    @torch.no_grad()
    def response_scores(self, rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
        """The probe's score of each rollout's response tokens, (len(token_ids),) each, in order."""
        limit = getattr(getattr(self.model, "config", None), "max_seq_len", None)
        for i, r in enumerate(rollouts):
            if not r.prompt_ids:
                raise ValueError(f"rollout {i} has no prompt ids: nothing precedes its response to score it from")
            if limit is not None and len(r.prompt_ids) + len(r.token_ids) > limit:
                raise ValueError(f"rollout {i} holds {len(r.prompt_ids) + len(r.token_ids)} tokens, more than the "
                                 f"model's max_seq_len {limit}")
        out: list[torch.Tensor] = []
        training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rollouts), self.config.batch_size):
                out += self._batch_scores(rollouts[start:start + self.config.batch_size])
        finally:
            self.model.train(training)
        return out

    def _batch_scores(self, batch: Sequence[Rollout]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        rows = [list(r.prompt_ids) + list(r.token_ids) for r in batch]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        layer, alignment = self.probe.config.layer, self.probe.config.alignment
        out = self.model.forward_outputs(ids.to(device), mask.to(device), hidden_layers=[layer])
        scores = score_tokens(self.probe.head, out.hidden_states[layer], alignment).cpu()  # (batch, width)
        return [scores[i, len(r.prompt_ids):len(r.prompt_ids) + len(r.token_ids)] for i, r in enumerate(batch)]

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        out = []
        for r, scores in zip(rollouts, self.response_scores(rollouts)):
            if len(scores) == 0:
                value = self.config.empty
            else:
                value = -float(scores.max() if self.config.reduce == "max" else scores.mean())
            out.append(value + (self.config.abstain_bonus if is_abstention(r.text) else 0.0))
        return out
