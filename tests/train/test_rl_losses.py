"""RL losses against hand-computed values and reference recursions: GAE, the clipped surrogate (both sides, decoupled
clip, token vs sequence aggregation), the clipped value loss, KL estimators, GRPO group advantages and DAPO's
dynamic-sampling filter and overlong shaping."""

from __future__ import annotations

import math

import pytest
import torch

from lucidlm.train.rl_losses import (
    aggregate,
    dynamic_sampling_keep,
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped_rewards,
    overlong_reward_shaping,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """The textbook recursion on one finished episode: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_matches_the_reference_recursion_on_padded_sequences():
    g = torch.Generator().manual_seed(0)
    lengths, t = [5, 2, 7], 7
    rewards, values = torch.randn(3, t, generator=g), torch.randn(3, t, generator=g)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = reference_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.9, 0.8)
        torch.testing.assert_close(advantages[i, :n], torch.tensor(expected), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(returns[i, :n], torch.tensor(expected) + values[i, :n], rtol=1e-5, atol=1e-6)
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0
    # left padding: the same real tokens give the same advantages
    left_mask = mask.flip(-1)
    rolled_r = torch.stack([torch.roll(rewards[i], t - n) for i, n in enumerate(lengths)])
    rolled_v = torch.stack([torch.roll(values[i], t - n) for i, n in enumerate(lengths)])
    left_adv, _ = gae(rolled_r, rolled_v, left_mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(left_adv[i, t - n:], advantages[i, :n], rtol=1e-5, atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_return_minus_the_value():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.9]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.1]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0]]))


def _ratios(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((1, len(ratios)), -1.0)
    logp = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    return logp, old


def test_policy_loss_clips_both_sides_by_hand():
    # ρ = 1.5 A=+1: clipped at 1.2 (high side); ρ = 0.5 A=−1: clipped at 0.8 (low side);
    # ρ = 1.1 A=+1: inside; ρ = 0.7 A=+1: below 1 − ε but the unclipped term is the pessimistic one
    logp, old = _ratios([1.5, 0.5, 1.1, 0.7])
    advantages, mask = torch.tensor([[1.0, -1.0, 1.0, 1.0]]), torch.ones(1, 4)
    out = ppo_policy_loss(logp, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 1.1 - 0.7) / 4)
    assert (out.clip_fraction.item(), out.clip_low_fraction.item(), out.clip_high_fraction.item()) == (0.5, 0.25, 0.25)
    out.loss.backward()
    # clipped tokens give no gradient; the others −A·ρ / tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.1 / 4, -0.7 / 4]]))


def test_clip_higher_lets_the_rising_token_through():
    logp, old = _ratios([1.5, 0.5, 1.1, 0.7])
    out = ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0, 1.0, 1.0]]), torch.ones(1, 4), clip_low=0.2,
                          clip_high=0.6)
    assert out.loss.item() == pytest.approx((-1.5 + 0.8 - 1.1 - 0.7) / 4)
    assert out.clip_high_fraction.item() == 0.0 and out.clip_low_fraction.item() == 0.25


def test_token_and_sequence_aggregation_differ_on_unequal_lengths():
    # ρ = 1 everywhere, so each token's loss is −A: sequence 1 has one token (−4), sequence 2 three (−1, −2, −3)
    logp = torch.zeros(2, 3)
    advantages = torch.tensor([[4.0, 9.0, 9.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    token = ppo_policy_loss(logp, logp, advantages, mask, aggregation="token").loss
    sequence = ppo_policy_loss(logp, logp, advantages, mask, aggregation="sequence").loss
    assert token.item() == pytest.approx(-10 / 4)  # DAPO: every token weighs the same
    assert sequence.item() == pytest.approx((-4 + -2) / 2)  # GRPO: every response weighs the same
    # one advantage per response broadcasts over its tokens
    per_response = ppo_policy_loss(logp, logp, torch.tensor([4.0, 2.0]), mask, aggregation="token").loss
    assert per_response.item() == pytest.approx(-(4 + 2 * 3) / 4)
    # a response without a real token is left out of the sequence mean
    empty = aggregate(torch.ones(2, 2), torch.tensor([[0, 0], [1, 1]]), "sequence")
    assert empty.item() == 1.0


def test_value_loss_is_the_clipped_squared_error_by_hand():
    values = torch.tensor([[1.0, 0.6, 0.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 0.0, 1.0]])
    loss, clip_fraction = ppo_value_loss(values, old_values, returns, torch.ones(1, 3), clip=0.2)
    # V_clip = 0.7, 0.6, 0.3: errors max(0, 0.09), max(0.36, 0.36), max(1, 0.49)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.36 + 1.0) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)


def test_kl_estimators_by_hand_and_in_expectation():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    # sampled from π, k1 and k3 average to the exact KL(π‖π_ref); k3 is never negative
    pi, pi_ref = torch.tensor([0.5, 0.2, 0.2, 0.1]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((pi * (pi / pi_ref).log()).sum())
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lr = pi.log()[samples][None], pi_ref.log()[samples][None]
    assert kl_penalty(lp, lr, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_penalty(lp, lr, "k3").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_penalty(lp, lr, "k3").min() >= 0


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards = kl_shaped_rewards(torch.tensor([2.0, 3.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.15 + 3.0, 0.0, 0.0]]))


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(rewards, group_size=4)
    s = 0.5 / math.sqrt(1 / 3)  # group 1: mean 0.5, sample std sqrt(1/3)
    expected = [s, -s, -s, s, 0.5, 0.5, 0.5, -1.5, 0, 0, 0, 0]  # group 2: mean 0.75, std 0.5; group 3: all equal
    torch.testing.assert_close(a, torch.tensor(expected), rtol=1e-4, atol=1e-5)
    centred = group_advantages(rewards, 4, normalize_std=False)
    torch.testing.assert_close(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75, 0, 0, 0, 0]))


def test_dynamic_sampling_drops_groups_of_equal_rewards():
    keep = dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), group_size=2)
    assert keep.tolist() == [False, False, True, True, False, False]


def test_overlong_shaping_at_its_boundaries():
    lengths = torch.tensor([10, 80, 81, 90, 100, 101, 500])
    shaped = overlong_reward_shaping(lengths, max_len=100, cache_len=20)
    torch.testing.assert_close(shaped, torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]))


def test_whiten_has_zero_mean_unit_variance_on_real_tokens():
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs() < 1e-6 and real.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
    assert w[~mask.bool()].abs().sum() == 0


def test_bad_inputs_name_the_problem():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        ppo_policy_loss(x, x, x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="clip_low"):
        ppo_policy_loss(x, x, x, x, clip_low=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(x, x, x, x, aggregation="mean")
    with pytest.raises(ValueError, match="gamma and lam"):
        gae(x, x, x, gamma=1.5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="cache_len"):
        overlong_reward_shaping(torch.tensor([1]), max_len=10, cache_len=0)
    with pytest.raises(ValueError, match="value clip"):
        ppo_value_loss(x, x, x, x, clip=0)
