"""RL on the trainer (train/rl.py, train/rl_rollouts.py): GRPO raises a bandit's reward, a resumed run equals an
uninterrupted one, the rollouts are the engine's samples and their old log-probs its log-probs, dynamic sampling
drops all-equal groups and refills, PPO's value loss falls on a fixed reward, DAPO's switches, bad input named
first. References: lm.sample with the same seed, the policy's own softmax, hand-computed group normalisation,
DAPO's overlong formula and reward-to-go returns."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from tiny_lm import tiny_lm

from lucidlm.train.dpo import frozen_reference
from lucidlm.train.rewards import RLPrompt
from lucidlm.train.rl import RLConfig, RLModel, RLObjective, rl_weights, token_logprobs
from lucidlm.train.rl_rollouts import RolloutSource, derived_seed, read_prompts
from lucidlm.train.trainer import TrainConfig, Trainer

TARGET = 73  # the most likely first token of the sharpened tiny model after "x", at p ≈ 0.125


class Hit:
    """1 when the response starts with ``TARGET``."""

    name = "hit"

    def __call__(self, rollouts):
        return [float(r.token_ids[:1] == (TARGET,)) for r in rollouts]


class Constant:
    name = "constant"

    def __call__(self, rollouts):
        return [1.0] * len(rollouts)


class EvenFirst:
    """Prompts starting with "same" always score 1 (an all-equal group); others 1 when the first token is even."""

    name = "even"

    def __call__(self, rollouts):
        return [1.0 if r.prompt.text.startswith("same") else float(bool(r.token_ids) and r.token_ids[0] % 2 == 0)
                for r in rollouts]


def _setup(algo="grpo", prompts=("x",), reward=None, sharpen=10.0, **options):
    lm = tiny_lm(sharpen=sharpen)
    config = RLConfig(algo=algo, **options)
    model = RLModel(lm.model, value_head=algo == "ppo", generator=torch.Generator().manual_seed(0))
    source = RolloutSource(model, lm.generator(), [RLPrompt(text=p) for p in prompts], [(reward or Hit(), 1.0)],
                           config, frozen_reference(lm.model))
    return lm, model, source


def _trainer(model, source, out, steps, lr=1e-2, save_every=1000):
    train = TrainConfig(out_dir=str(out), max_steps=steps, lr=lr, warmup_steps=1, save_every=save_every,
                        device="cpu", progress=False)
    save, load = rl_weights()
    return Trainer(model, train, source, objective=RLObjective(source.config), save_weights=save, load_weights=load)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _p_target(lm) -> float:
    with torch.no_grad():
        return float(torch.softmax(lm.model(torch.tensor([lm.encode("x")]))[0, -1], -1)[TARGET])


def test_grpo_raises_the_reward_of_a_bandit(tmp_path):
    lm, model, source = _setup(group_size=8, prompts_per_step=1, max_new_tokens=1)
    before = _p_target(lm)
    _trainer(model, source, tmp_path, steps=6).fit()
    rewards = [r["reward"] for r in _metrics(tmp_path)]
    after = _p_target(lm)
    assert before < 0.2 and statistics.mean(rewards[:2]) <= 0.25
    assert after > 0.9 and statistics.mean(rewards[-2:]) >= 0.9, (before, after, rewards)


def test_resume_mid_rollout_equals_an_uninterrupted_run(tmp_path):
    def run(out, steps):
        torch.manual_seed(0)
        _, model, source = _setup("ppo", prompts=("x", "y"), group_size=2, prompts_per_step=2, max_new_tokens=3,
                                  minibatches=2)  # two optimizer steps per rollout: step 1 stops mid-rollout
        _trainer(model, source, out, steps, save_every=1).fit()
        return model

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "cut", 1)
    resumed = run(tmp_path / "cut", 3)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(_metrics(tmp_path / "whole")) == drop(_metrics(tmp_path / "cut"))
    start = tiny_lm(sharpen=10.0).model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in whole.policy.state_dict().items())  # it did train


def test_rollouts_are_the_engines_samples_and_old_logp_its_logprobs():
    lm, model, source = _setup(prompts=("ab", "cd", "ef"), group_size=3, prompts_per_step=2, max_new_tokens=6,
                               sharpen=3.0)
    scored = source.sample_round(0, 0)
    chosen = source.draw(0, 0)
    for g, i in enumerate(chosen):
        ref = lm.sample(source.prompts[i].text, n=3, seed=source.sampling_seed(0, 0), temperature=1.0,
                        max_new_tokens=6)
        assert [c.token_ids for c in scored.completions[3 * g:3 * g + 3]] == [c.token_ids for c in ref]
    batch = source.rollout()[0]  # step 0 again: the same seeded draw and samples
    mask = batch["response_mask"].bool()
    for row, completion in enumerate(scored.completions):
        assert batch["old_logp"][row][mask[row]].tolist() == pytest.approx(completion.logprobs, abs=1e-4)
    model.train()  # the training forward scores them alike: the first epoch's ratio is 1
    logits, _ = model(batch["input_ids"], batch["attention_mask"])
    logp = token_logprobs(logits, batch["input_ids"], source.config.temperature)
    assert (logp[mask] - batch["old_logp"][mask]).abs().max() < 1e-6
    parts = RLObjective(source.config)(model, batch)
    assert parts.metrics["clip_frac"] == 0.0 and parts.metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_rollouts_keep_each_prompts_own_limits_from_its_meta():
    lm = tiny_lm(sharpen=3.0)
    seed = derived_seed(0, 0, 0, 1)  # the rollout seed of step 0, round 0 (checked below)
    text = lm.sample("ab", n=1, seed=seed, temperature=1.0, max_new_tokens=8)[0].text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1)  # a piece of sample 0 (no partial UTF-8 byte)
                if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2])
    prompts = [RLPrompt(text="ab", meta={"stop": [stop]}), RLPrompt(text="cd", meta={"max_new_tokens": 3}),
               RLPrompt(text="ef", meta={"max_new_tokens": 50})]  # capped at the run's 8
    model = RLModel(lm.model, generator=torch.Generator().manual_seed(0))
    source = RolloutSource(model, lm.generator(), prompts, [(Hit(), 1.0)],
                           RLConfig(group_size=2, prompts_per_step=3, max_new_tokens=8), frozen_reference(lm.model))
    scored = source.sample_round(0, 0)
    assert source.sampling_seed(0, 0) == seed
    for g, i in enumerate(source.draw(0, 0)):
        limits = {0: dict(stop=[stop], max_new_tokens=8), 1: dict(max_new_tokens=3), 2: dict(max_new_tokens=8)}[i]
        ref = lm.sample(prompts[i].text, n=2, seed=source.sampling_seed(0, 0), temperature=1.0, **limits)
        assert [c.token_ids for c in scored.completions[2 * g:2 * g + 2]] == [c.token_ids for c in ref]
        if i == 0:
            assert ref[0].finish_reason == "stop" and stop not in ref[0].text
        assert all(len(c.token_ids) <= limits["max_new_tokens"] for c in ref)
    with pytest.raises(ValueError, match="'stop' must be a list"):
        RolloutSource(model, lm.generator(), [RLPrompt(text="ab", meta={"stop": "x"})], [(Hit(), 1.0)],
                      RLConfig(group_size=2, prompts_per_step=1), frozen_reference(lm.model))


def test_dynamic_sampling_drops_all_equal_groups_and_refills():
    prompts = ("same1", "same2", "mix1", "mix2", "mix3", "mix4")
    _, _, source = _setup(prompts=prompts, reward=EvenFirst(), sharpen=1.0, group_size=4, prompts_per_step=3,
                          max_new_tokens=2, dynamic_sampling=True, max_sampling_attempts=4)
    batches = source.rollout()
    batch, metrics = batches[0], batches[0]["rollout_metrics"]
    # the naive reference: replay the rounds, keep the groups whose rewards vary, in order, until 3
    kept, equal, rounds = [], 0, 0
    for attempt in range(4):
        scored = source.sample_round(0, attempt)
        rounds += 1
        for g in range(3):
            rewards = scored.shaped[4 * g:4 * g + 4]
            if rewards.max() > rewards.min():
                kept.append((scored, g))
            else:
                equal += 1
        if len(kept) >= 3:
            break
    assert len(kept) >= 3 and metrics["sampling_rounds"] == rounds > 1
    assert metrics["groups_dropped"] == pytest.approx(equal / (3 * rounds))
    expected = [s.completions[4 * g + j].token_ids for s, g in kept[:3] for j in range(4)]
    mask = batch["response_mask"].bool()
    assert [batch["input_ids"][r, 1:][mask[r]].tolist() for r in range(12)] == expected
    for k, (s, g) in enumerate(kept[:3]):  # GRPO's advantage: (r − mean) / (sample std + eps), by hand
        r = s.shaped[4 * g:4 * g + 4].tolist()
        want = [(x - statistics.mean(r)) / (statistics.stdev(r) + 1e-6) for x in r]
        got = [float(batch["advantages"][4 * k + j][mask[4 * k + j]][0]) for j in range(4)]
        assert got == pytest.approx(want, abs=1e-5)

    _, _, source = _setup(prompts=("same1", "same2"), reward=EvenFirst(), sharpen=1.0, group_size=2,
                          prompts_per_step=2, max_new_tokens=2, dynamic_sampling=True, max_sampling_attempts=3)
    batch = source.rollout()[0]  # nothing varies: the cap on rounds, then the last round with zero advantages
    assert batch["rollout_metrics"]["sampling_rounds"] == 3 and batch["rollout_metrics"]["groups_dropped"] == 1.0
    assert batch["input_ids"].shape[0] == 4 and not batch["advantages"].any()


def test_ppo_value_loss_falls_on_a_fixed_reward(tmp_path):
    lm, model, source = _setup("ppo", prompts=("x", "y"), reward=Constant(), group_size=2, prompts_per_step=2,
                               max_new_tokens=2, kl_beta=0.0, lam=1.0, whiten_advantages=False)
    batch = source.rollout()[0]
    mask = batch["response_mask"].bool()
    # γ = λ = 1 and no KL: the return of every response token is the reward-to-go, the final score 1
    assert batch["returns"][mask].tolist() == pytest.approx([1.0] * int(mask.sum()), abs=1e-5)
    assert (batch["advantages"] - (batch["returns"] - batch["old_values"]))[mask].abs().max() < 1e-5
    source.rollouts = 0  # train from the first rollout again
    _trainer(model, source, tmp_path, steps=5, lr=1e-2).fit()
    losses = [r["value_loss"] for r in _metrics(tmp_path)]
    assert losses[-1] < 0.3 * losses[0], losses


def test_dapo_is_grpo_with_four_switches_each_separate():
    dapo = RLConfig(algo="dapo").resolve()
    assert (dapo.clip_low, dapo.clip_high, dapo.aggregation, dapo.dynamic_sampling, dapo.overlong, dapo.kl_beta) == \
        (0.2, 0.28, "token", True, True, 0.0)
    grpo = RLConfig(algo="grpo").resolve()
    assert (grpo.clip_high, grpo.aggregation, grpo.dynamic_sampling, grpo.overlong, grpo.kl_beta, grpo.kl_estimator) \
        == (0.2, "sequence", False, False, 0.04, "k3")
    one = RLConfig(algo="grpo", overlong=True).resolve()
    assert [f for f in vars(one) if getattr(one, f) != getattr(grpo, f)] == ["overlong"]
    off = RLConfig(algo="dapo", dynamic_sampling=False).resolve()
    assert [f for f in vars(off) if getattr(off, f) != getattr(dapo, f)] == ["dynamic_sampling"]


def test_overlong_shaping_follows_dapo_formula():
    class Zero:
        name = "zero"

        def __call__(self, rollouts):
            return [0.0] * len(rollouts)

    _, _, source = _setup(prompts=("ab",), reward=Zero(), sharpen=1.0, group_size=8, prompts_per_step=1,
                          max_new_tokens=4, overlong=True, overlong_cache=2)
    scored = source.sample_round(0, 0)
    lengths = [len(c.token_ids) for c in scored.completions]
    # 0 up to L_max − L_cache = 2 tokens, then ((L_max − L_cache) − L) / L_cache: −0.5 at 3, −1 at 4
    assert scored.shaped.tolist() == [{1: 0.0, 2: 0.0, 3: -0.5, 4: -1.0}[n] for n in lengths]
    assert 4 in lengths


def test_bad_input_is_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown RL algorithm 'reinforce'"):
        RLConfig(algo="reinforce").resolve()
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        RLConfig(algo="grpo", group_size=1).resolve()
    with pytest.raises(ValueError, match="dynamic_sampling"):
        RLConfig(algo="ppo", dynamic_sampling=True).resolve()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RLConfig(temperature=0.0).resolve()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts([empty])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_prompts([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts([bad])
    with pytest.raises(ValueError, match="prompts_per_step"):
        _setup(prompts=("x",), prompts_per_step=2)
    with pytest.raises(ValueError, match="context"):
        _setup(prompts=("x" * 300,), prompts_per_step=1, max_new_tokens=8)


def test_reward_model_reward_scores_as_the_reward_models_pairs(tmp_path):
    from lucidlm.train.reward_model import RewardModel, RewardPairDataset, pair_rewards
    from lucidlm.train.rewards import RewardModelReward, Rollout

    lm = tiny_lm(sharpen=1.0)
    rm = RewardModel(lm.model, generator=torch.Generator().manual_seed(3))
    answers = [("Where is Ada?", "In Rome."), ("Who is Bo?", "A baker, I think"), ("Name a town.", "Lyon")]
    rollouts = [Rollout(RLPrompt(text=p), tuple(lm.encode(p)), tuple(lm.encode(a, False)), a, "stop")
                for p, a in answers]
    got = RewardModelReward(rm, lm.tokenizer, batch_size=2)(rollouts)
    rows = tmp_path / "pairs.jsonl"  # the reward model's own data path: each answer as the chosen side of a pair
    rows.write_text("".join(json.dumps({"prompt": p, "chosen": a, "rejected": "no"}) + "\n" for p, a in answers))
    chosen, _ = pair_rewards(rm, RewardPairDataset([rows], lm.tokenizer, 256, 3, epochs=1))
    assert got == pytest.approx(chosen.tolist(), abs=1e-5)
