"""What an RL step scores: one sampled response (``Rollout``) and the ``Reward`` interface every reward source
implements — a reward model, a verifiable reward from ground truth, the hallucination probe.

A reward returns one scalar per response (GRPO/DAPO compare the responses of one prompt; PPO puts the scalar on
the response's last token and adds the per-token KL penalty). Sources that need more than ``train/`` may import
(the world's labeler, the facts grader, the probe) live in ``apps/`` and implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..tokenizer import pad_id


@dataclass(frozen=True)
class RLPrompt:
    """One prompt of an RL run: chat ``messages`` (or a raw ``text`` prompt) and whatever its rewards need to
    judge an answer (``meta``: e.g. the entity or question id whose ground truth a verifiable reward looks up)."""

    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.text is None) == (not self.messages):
            raise ValueError("an RL prompt has either chat messages or a text prompt (exactly one of them)")


@dataclass(frozen=True)
class Rollout:
    """One sampled response to ``prompt``: its text and token ids (EOS excluded), and why it stopped."""

    prompt: RLPrompt
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (cut at max_new_tokens)


class Reward(Protocol):
    """Scores responses: one float per rollout, in order."""

    name: str

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]: ...


class RewardModelReward:
    """A trained reward model (train/reward_model.py) as a reward: each prompt + response is formatted as the
    reward model's training pairs were (``ChatFormatter.pair``: the chat template, or prompt + response + EOS)
    and scored in batches of ``batch_size``. The reward model must be its own copy: the policy trains."""

    def __init__(self, model, tokenizer, max_len: int | None = None, batch_size: int = 16,
                 name: str = "model") -> None:
        from .sft_data import ChatFormatter

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.name, self.batch_size = model.eval(), name, batch_size
        self.formatter = ChatFormatter(tokenizer, max_len or model.config.max_seq_len)
        self.pad = pad_id(tokenizer)

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        import torch

        from .sft_data import pad_batch

        device = next(self.model.parameters()).device
        scores: list[float] = []
        for i in range(0, len(rollouts), self.batch_size):
            examples = [self.formatter.pair(list(r.prompt.messages) or r.prompt.text, r.text)
                        for r in rollouts[i:i + self.batch_size]]
            batch = pad_batch(examples, self.pad)
            with torch.no_grad():
                scores += self.model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        return scores
