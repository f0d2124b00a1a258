"""RL fine-tuning on the trainer: PPO (the InstructGPT recipe), GRPO (DeepSeekMath) and DAPO, as one config,
one model wrapper (the policy, and PPO's value head) and one objective. The rollouts it trains on come from
``rl_rollouts.RolloutSource``; the losses are ``rl_losses.py``'s.

    RolloutSource ─batch─▶ RLObjective(model, batch) ─▶ LossParts ─▶ the trainer's backward, clip, AdamW

A batch holds one rollout's responses (or a minibatch of them): ``input_ids`` / ``attention_mask`` (b, s) of
prompt + response, right-padded, and per target token (b, s − 1), aligned with ``input_ids[:, 1:]``:
``response_mask`` (1 on the response's tokens), ``old_logp`` (the sampling policy's log-probs), ``ref_logp``
(the reference's), ``advantages``; PPO adds ``old_values`` and ``returns``.

DAPO is GRPO with four changes, each its own switch here, so their effect can be measured one by one:
clip-higher (``clip_high`` > ``clip_low``), dynamic sampling (``dynamic_sampling``), the token-level loss
(``aggregation="token"``) and overlong reward shaping (``overlong``); ``algo="dapo"`` only changes their
defaults (ε_low 0.2, ε_high 0.28, all on, and no KL term, as the paper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic_io import atomic_write
from ..model.transformer import Transformer
from .config_file import opt
from .objectives import LossParts
from .rl_losses import AGGREGATIONS, aggregate, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss
from .trainer import default_load_weights, default_save_weights

ALGOS = ("ppo", "grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")

# what each algorithm sets when an option is left at None: (PPO, GRPO, DAPO)
_DEFAULTS = {
    "kl_beta": (0.05, 0.04, 0.0),  # PPO: in the reward (InstructGPT); GRPO: in the loss (DeepSeekMath 0.04)
    "kl_estimator": ("k1", "k3", "k3"),
    "aggregation": ("token", "sequence", "token"),
    "dynamic_sampling": (False, False, True),
    "overlong": (False, False, True),
}
DAPO_CLIP_HIGH = 0.28


@dataclass
class RLOptions:
    group_size: int = opt(4, "responses sampled per prompt (GRPO and DAPO compare them; PPO may use 1)")
    prompts_per_step: int = opt(8, "prompts per rollout step (with dynamic sampling: groups kept per step)")
    max_new_tokens: int = opt(64, "tokens per response at most (DAPO's L_max)")
    temperature: float = opt(1.0, "sampling temperature (> 0); the log-probs are those of logits / temperature")
    top_p: float = opt(1.0, "nucleus sampling (1: off)")
    clip_low: float = opt(0.2, "PPO's ε below: the ratio is clipped at 1 − clip_low")
    clip_high: float | None = opt(None, "ε above: clipped at 1 + clip_high (default: clip_low; dapo: 0.28, "
                                        "clip-higher)")
    kl_beta: float | None = opt(None, "weight of KL(π‖π_ref) (default: ppo 0.05 in the reward, grpo 0.04 in the "
                                      "loss, dapo 0)")
    kl_estimator: str | None = opt(None, "k1, k2 or k3 (default: k1 for ppo's reward penalty, k3 for the loss term)")
    aggregation: str | None = opt(None, "token (every token of the batch weighs the same) or sequence (each "
                                        "response's mean, then the mean) (default: sequence for grpo, else token)")
    normalize_std: bool = opt(True, "GRPO/DAPO: divide the group advantages by the group's std (false: Dr. GRPO)")
    dynamic_sampling: bool | None = opt(None, "drop groups whose rewards are all equal and sample more prompts to "
                                              "fill the step (default: on for dapo)")
    max_sampling_attempts: int = opt(3, "with dynamic sampling: rollout rounds per step at most")
    overlong: bool | None = opt(None, "DAPO's soft overlong penalty on the reward (default: on for dapo)")
    overlong_cache: int | None = opt(None, "L_cache: the penalty ramps from 0 to −1 over the last this many tokens "
                                           "before max_new_tokens (default: max_new_tokens // 5)")
    ppo_epochs: int = opt(1, "passes over each rollout")
    minibatches: int = opt(1, "optimizer steps per pass: the rollout's responses split in this many")
    gamma: float = opt(1.0, "PPO: discount of GAE")
    lam: float = opt(0.95, "PPO: λ of GAE")
    value_coef: float = opt(0.1, "PPO: weight of the value loss")
    value_clip: float = opt(0.2, "PPO: the value head's update is clipped to ±value_clip of its rollout value")
    whiten_advantages: bool = opt(True, "PPO: normalise the advantages over the rollout's tokens")
    seed: int = opt(0, "seed of the prompt draws and of the sampling (each step's seed derives from it)")


@dataclass
class RLConfig(RLOptions):
    algo: str = opt("grpo", "ppo (value head + GAE + KL in the reward), grpo (group-relative advantages, KL in "
                            "the loss) or dapo (grpo with clip-higher, dynamic sampling, token loss, overlong "
                            "shaping)")

    def resolve(self) -> RLConfig:
        """A copy with every unset option filled in from ``algo``'s defaults, checked; ValueError naming each
        problem (before any work)."""
        if self.algo not in ALGOS:
            raise ValueError(f"unknown RL algorithm {self.algo!r}; choose from {list(ALGOS)}")
        column = ALGOS.index(self.algo)
        filled = {k: v[column] for k, v in _DEFAULTS.items() if getattr(self, k) is None}
        if self.clip_high is None:
            filled["clip_high"] = DAPO_CLIP_HIGH if self.algo == "dapo" else self.clip_low
        if self.overlong_cache is None and isinstance(self.max_new_tokens, int):
            filled["overlong_cache"] = max(1, self.max_new_tokens // 5)
        config = dataclasses.replace(self, **filled)
        config.check()
        return config

    def check(self) -> None:
        problems = []
        ints = ("group_size", "prompts_per_step", "max_new_tokens", "max_sampling_attempts", "ppo_epochs",
                "minibatches", "overlong_cache")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1 (got {value!r})")
        if not problems:
            if self.algo != "ppo" and self.group_size < 2:
                problems.append(f"{self.algo} compares the responses of a group: group_size must be >= 2 "
                                f"(got {self.group_size})")
            if self.minibatches > self.prompts_per_step * self.group_size:
                problems.append(f"minibatches ({self.minibatches}) exceed the {self.prompts_per_step * self.group_size}"
                                " responses of a step")
            if self.overlong_cache > self.max_new_tokens:
                problems.append(f"overlong_cache ({self.overlong_cache}) exceeds max_new_tokens "
                                f"({self.max_new_tokens})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0: RL samples its responses (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            problems.append(f"need 0 <= clip_low < 1 and clip_high >= 0 (got {self.clip_low}, {self.clip_high})")
        if self.kl_beta < 0:
            problems.append(f"kl_beta must be >= 0 (got {self.kl_beta})")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator must be one of {list(KL_ESTIMATORS)} (got {self.kl_estimator!r})")
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {list(AGGREGATIONS)} (got {self.aggregation!r})")
        if self.algo == "ppo" and self.dynamic_sampling:
            problems.append("dynamic_sampling drops groups of equal rewards, which only group advantages (grpo, "
                            "dapo) make useless; ppo's value head gives them an advantage")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(f"gamma and lam must be in [0, 1] (got {self.gamma}, {self.lam})")
        if self.value_coef < 0 or self.value_clip <= 0:
            problems.append(f"need value_coef >= 0 and value_clip > 0 (got {self.value_coef}, {self.value_clip})")
        if problems:
            raise ValueError("bad RL config: " + "; ".join(problems))


# --- the model: the policy and PPO's value head ------------------------------------------------------
class RLModel(nn.Module):
    """The policy (a lucidlm Transformer, with LoRA layers or not) and, for PPO, a value head ``Linear(dim, 1)``
    on the final-norm state of every position (what the LM head reads)."""

    def __init__(self, policy: Transformer, value_head: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head: nn.Linear | None = None
        if value_head:
            head = nn.Linear(policy.config.dim, 1)
            with torch.no_grad():  # small: the first values are near 0, the returns' scale set by the rewards
                head.weight.copy_(torch.randn(1, policy.config.dim, generator=generator) * policy.config.init_std)
                head.bias.zero_()
            self.value_head = head.to(next(policy.parameters()).device)

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (b, s, vocab), values (b, s) float32 or None)."""
        if self.value_head is None:
            return self.policy(input_ids, attention_mask=attention_mask), None
        last = self.config.n_layers - 1
        out = self.policy.forward_outputs(input_ids, attention_mask, hidden_layers=[last])
        h = self.policy.norm(out.hidden_states[last])
        return out.logits, self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()


VALUE_HEAD_FILE = "value_head.safetensors"
Weights = Callable[[nn.Module, Path], None]


def rl_weights(save_policy: Weights = default_save_weights, load_policy: Weights = default_load_weights
               ) -> tuple[Weights, Weights]:
    """The trainer's (save_weights, load_weights) for an RLModel: the policy's own (a full model, or a LoRA
    adapter: sft's functions) + ``value_head.safetensors`` when it has a value head."""

    def save(model: RLModel, directory: Path) -> None:
        save_policy(model.policy, directory)
        if model.value_head is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in model.value_head.state_dict().items()}
            with atomic_write(Path(directory) / VALUE_HEAD_FILE) as tmp:
                save_file(state, str(tmp))

    def load(model: RLModel, directory: Path) -> None:
        load_policy(model.policy, directory)
        if model.value_head is not None:
            path = Path(directory) / VALUE_HEAD_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (a PPO checkpoint holds its value head)")
            model.value_head.load_state_dict(load_file(str(path)))

    return save, load


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(b, s − 1) log p(input_ids[:, t + 1] | ..t) under softmax(logits / temperature), the distribution the
    responses were sampled from (as TRL and verl score them); logits (b, s, vocab)."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    return logp.gather(-1, input_ids[:, 1:, None])[..., 0]


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(b, s − 1) entropy of the next-token distribution at every position but the last."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


# --- the objective -----------------------------------------------------------------------------------
class RLObjective:
    """The trainer's objective on rollout batches. GRPO / DAPO: the clipped surrogate (+ β·KL(π‖π_ref) with
    ``kl_estimator`` in the loss, aggregated as the surrogate); PPO: the surrogate + value_coef × the clipped
    value loss (its KL is in the rewards, rl_rollouts.py). Each batch is one mean, so ``count`` is 1."""

    # the surrogate hovers around 0 and changes sign: the trainer's spike guard refuses only a NaN loss
    relative_spike_guard = False

    def __init__(self, config: RLConfig) -> None:
        self.config = config.resolve()

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return 1

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        cfg = self.config
        ids, mask = batch["input_ids"], batch["response_mask"]
        logits, values = model(ids, batch["attention_mask"])
        logp = token_logprobs(logits, ids, cfg.temperature)
        policy = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip_low, cfg.clip_high,
                                 cfg.aggregation)
        loss = policy.loss
        kl = kl_penalty(logp, batch["ref_logp"], cfg.kl_estimator)
        metrics = {"policy_loss": float(policy.loss.detach()), "clip_frac": float(policy.clip_fraction),
                   "clip_low_frac": float(policy.clip_low_fraction), "clip_high_frac": float(policy.clip_high_fraction),
                   "kl": float(masked_mean(kl_penalty(logp.detach(), batch["ref_logp"], "k3"), mask)),
                   "entropy": float(masked_mean(token_entropy(logits, cfg.temperature), mask))}
        if cfg.algo == "ppo":
            if values is None:
                raise ValueError("ppo needs the model's value head: RLModel(policy, value_head=True)")
            value_loss, value_clip = ppo_value_loss(values[:, :-1], batch["old_values"], batch["returns"], mask,
                                                    cfg.value_clip, cfg.aggregation)
            loss = loss + cfg.value_coef * value_loss
            metrics.update(value_loss=float(value_loss.detach()), value_clip_frac=float(value_clip))
        elif cfg.kl_beta > 0:
            loss = loss + cfg.kl_beta * aggregate(kl, mask, cfg.aggregation)
        metrics.update(batch.get("rollout_metrics", {}))
        return LossParts(loss, 1, None, metrics)
