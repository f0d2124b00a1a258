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
