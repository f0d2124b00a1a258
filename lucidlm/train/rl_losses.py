"""The losses and advantage estimators of RL fine-tuning: PPO (with GAE and the KL penalty, the InstructGPT
recipe), GRPO and DAPO. Pure functions on tensors; the trainer that rolls out and calls them is elsewhere.

Shapes: a batch of ``b`` responses padded to ``t`` tokens; per-token tensors are (b, t) and ``mask`` (b, t) is 1
on the response's real tokens, 0 on padding. Group-wise functions take one reward per response, (n,), with the
``group_size`` samples of one prompt consecutive: rows [g·k, (g+1)·k) are prompt g's.

- PPO (Schulman et al. 2017): ratio ρ = π/π_old per token, loss −min(ρA, clip(ρ, 1−ε, 1+ε)A); advantages by
  GAE (Schulman et al. 2016) from a value head trained with the clipped value loss; InstructGPT (Ouyang et al.
  2022) puts −β·KL(π‖π_ref) per token into the reward, the reward model's score on the last token.
- GRPO (Shao et al. 2024, DeepSeekMath): no value head; a response's advantage is its reward normalised
  within its group, (r − mean)/(std + eps), on every token; β·KL (the k3 estimator) is added to the loss, and
  the loss is averaged per sequence, then over sequences.
- DAPO (Yu et al. 2025): clip-higher (ε_low < ε_high, so unlikely tokens can rise), dynamic sampling (groups
  whose rewards are all equal carry no gradient and are dropped), a token-level loss (every token of the batch
  weighs the same, however long its response), overlong reward shaping (a soft penalty near the length limit).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Aggregation = Literal["token", "sequence"]
AGGREGATIONS = ("token", "sequence")
KLEstimator = Literal["k1", "k2", "k3"]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"expected (batch, tokens) tensors of one shape, got {shapes}")


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token") -> torch.Tensor:
    """Scalar from per-token losses (b, t). "token": Σ over every real token of the batch / their number (DAPO);
    "sequence": each response's mean over its tokens, then the mean over responses (GRPO) — a token of a short
    response then weighs more than one of a long response. Responses without a real token are left out."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {mode!r}")
    mask = mask.to(losses.dtype)
    if mode == "token":
        return (losses * mask).sum() / mask.sum().clamp(min=1)
    lengths = mask.sum(-1)  # (b,)
    per_sequence = (losses * mask).sum(-1) / lengths.clamp(min=1)
    present = (lengths > 0).to(losses.dtype)
    return (per_sequence * present).sum() / present.sum().clamp(min=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the real tokens (PPO normalises its advantages so); padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


# --- PPO: advantages, policy and value losses, the KL penalty ---------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: (advantages, returns), each (b, t).

    δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, over the real tokens only (padding is skipped, so
    the next real token follows); the episode ends after a response's last real token (V = 0 beyond it: a
    finished answer, as in InstructGPT). Returns = A + V, the value head's target. Padding gets 0."""
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    rewards, values = rewards.float(), values.float().detach()
    real = mask.float()
    b, t = rewards.shape
    next_value = torch.zeros(b, device=rewards.device)
    next_advantage = torch.zeros(b, device=rewards.device)
    advantages = torch.zeros_like(rewards)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        here = delta + gamma * lam * next_advantage
        advantages[:, i] = here * real[:, i]
        # a padding position passes the next real token's value and advantage through unchanged
        next_value = torch.where(real[:, i] > 0, values[:, i], next_value)
        next_advantage = torch.where(real[:, i] > 0, here, next_advantage)
    return advantages, (advantages + values) * real


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, aggregated
    clip_fraction: torch.Tensor  # share of real tokens whose gradient the clip removed
    clip_low_fraction: torch.Tensor  # ... of them with ρ < 1 − ε_low (A < 0)
    clip_high_fraction: torch.Tensor  # ... with ρ > 1 + ε_high (A > 0): what DAPO's clip-higher loosens


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.2,
                    aggregation: Aggregation = "token") -> PolicyLoss:
    """The clipped surrogate −min(ρA, clip(ρ, 1 − clip_low, 1 + clip_high)·A), ρ = exp(logp − old_logp), per
    token (b, t), aggregated by ``aggregation``. PPO and GRPO clip both sides by one ε; DAPO decouples them
    (ε_low 0.2, ε_high 0.28). ``advantages`` is (b, t), or (b,) for one advantage per response (GRPO)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    advantages = advantages.detach().float()
    # a log-ratio past ±20 is a broken rollout; clamped, as verl does, so that exp gives no inf (0·inf = NaN)
    ratio = torch.exp((logp.float() - old_logp.detach().float()).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    cut = clipped > unclipped  # the clipped term is the one taken: no gradient from this token
    return PolicyLoss(aggregate(losses, mask, aggregation), masked_mean(cut.float(), mask),
                      masked_mean((cut & (ratio < 1)).float(), mask), masked_mean((cut & (ratio > 1)).float(), mask))


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2, aggregation: Aggregation = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): ½·max((V − R)², (V_clip − R)²) with V_clip = V_old + clip(V − V_old, ±clip), the
    value head kept near the values it had at rollout time (PPO's and InstructGPT's value loss); all (b, t)."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip <= 0:
        raise ValueError(f"value clip must be > 0, got {clip}")
    values, old_values, returns = values.float(), old_values.detach().float(), returns.detach().float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    losses = 0.5 * torch.maximum(plain_error, clipped_error)
    return aggregate(losses, mask, aggregation), masked_mean((clipped_error > plain_error).float(), mask)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of tokens sampled from π, (b, t) (Schulman, "Approximating
    KL divergence", 2020), with log r = ref_logp − logp: k1 = −log r (unbiased, can be negative; InstructGPT's
    reward penalty), k2 = ½(log r)², k3 = (r − 1) − log r (unbiased and ≥ 0; GRPO's loss term)."""
    log_r = ref_logp.float() - logp.float()
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"KL estimator must be k1, k2 or k3, got {estimator!r}")


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """InstructGPT's per-token rewards (b, t): −β·KL_t on every real token, plus the response's score (b,) on its
    last real token."""
    _check_same_shape(kl=kl, mask=mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be (batch,) = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}")
    real = mask.float()
    rewards = -beta * kl.float() * real
    last = (real * torch.arange(1, real.shape[1] + 1, device=real.device)).argmax(-1)  # (b,)
    has_token = real.sum(-1) > 0
    rewards[torch.arange(len(scores), device=real.device)[has_token], last[has_token]] += scores.float()[has_token]
    return rewards


# --- GRPO and DAPO: rewards per group ------------------------------------------------------------------
def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n,) -> (n / group_size, group_size)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (n,), one per response; got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantages (n,): (r − mean of its group) / (std of its group + eps); the std is the sample
    std (n − 1), as verl's and TRL's GRPO compute it. ``normalize_std=False``: r − mean only (Dr. GRPO's
    choice, which does not up-weight groups of near-equal rewards)."""
    groups = _groups(rewards, group_size)
    if normalize_std and group_size < 2:
        raise ValueError("the std of a group needs group_size >= 2")
    centred = groups - groups.mean(-1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.flatten()


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: a boolean (n,), False for every response of a group whose rewards are all
    equal (all right or all wrong: zero advantage, so no gradient, only a smaller effective batch)."""
    groups = _groups(rewards, group_size)
    varied = groups.amax(-1) > groups.amin(-1)  # (groups,)
    return varied.repeat_interleave(group_size)


def overlong_reward_shaping(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (n,), added to the reward of responses of ``lengths`` tokens (n,):
    0 up to L_max − L_cache, then falling linearly, ((L_max − L_cache) − L) / L_cache, to −1 at L_max; −1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    expected = max_len - cache_len
    penalty = (expected - lengths.float()) / cache_len
    return penalty.clamp(min=-1.0, max=0.0)
