"""What ``lucidlm rl`` does: a policy, prompts and rewards in; PPO, GRPO or DAPO on the trainer; the policy out
(a PEFT adapter with --lora, else the full model, as sft writes it; PPO adds value_head.safetensors).

Rewards are named by specs, ``NAME`` or ``NAME:ARG``, looked up in ``REWARDS``: each entry builds a ``Reward``
(train/rewards.py) from its argument and the loaded policy (its tokenizer, device). ``model:DIR`` is a reward
model from ``lucidlm reward train``; more sources register one line each here (apps/rl_rewards.py's verifiable
and probe rewards). Several specs are summed, weighted by ``--reward-weights``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..api import LM, load
from ..checkpoint.loader import load_model
from ..device import resolve_device
from ..tokenizer import Tokenizer
from ..train.checkpointing import ensure_writable_dir
from ..train.config_file import opt
from ..train.dpo import frozen_reference
from ..train.metrics import plot_reward_curve
from ..train.reward_model import load_reward_model, read_reward_config
from ..train.rewards import Reward, RewardModelReward
from ..train.rl import RLConfig, RLModel, RLObjective, RLOptions, rl_weights
from ..train.rl_rollouts import RolloutSource, read_prompts
from ..train.trainer import TrainConfig, Trainer, default_load_weights, default_save_weights
from .rl_rewards import REWARD_FACTORIES, VERIFIABLE_REWARDS, RewardFactory, VerifiableRewardConfig
from .train_recipes import LoRAOptions, _export, _load_adapter, _lora_info, _save_adapter, _with_tokenizer


def reward_model_reward(directory: str, lm: LM) -> Reward:
    """``model:DIR``: the reward model in DIR on its own copy of the base model it recorded (the policy trains)."""
    if not directory:
        raise ValueError("the reward spec model:DIR needs the reward model's directory")
    config = read_reward_config(directory)
    if config.base_model is None:
        raise ValueError(f"{directory}: the reward model records no base model to load")
    loaded = load_model(config.base_model, dtype=torch.float32, device=lm.device)
    tokenizer = Tokenizer.from_dir(config.base_model) or lm.tokenizer
    return RewardModelReward(load_reward_model(directory, loaded.model, loaded.family), tokenizer, name="model")


# (the spec's argument, the policy as loaded) -> the reward; the ground-truth and probe rewards are rl_rewards.py's
REWARDS: dict[str, RewardFactory] = {"model": reward_model_reward, **REWARD_FACTORIES}


def parse_reward_spec(spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:ARG`` → (name, arg); an unknown name is a ValueError listing the known ones."""
    name, _, arg = spec.partition(":")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} in --reward {spec!r}; known: {sorted(REWARDS)} (NAME or NAME:ARG)")
    return name, arg


def build_reward(name: str, arg: str, lm: LM, verifiable: VerifiableRewardConfig) -> Reward:
    if name in VERIFIABLE_REWARDS:
        return REWARDS[name](arg, lm, verifiable)
    return REWARDS[name](arg, lm)


@dataclass
class RLRun:
    algo: str = opt("grpo", "ppo (value head, GAE, KL in the reward: InstructGPT), grpo (group-relative "
                            "advantages, KL in the loss: DeepSeekMath) or dapo (grpo + clip-higher, dynamic sampling, "
                            "token-level loss, overlong shaping; each also a --rl option)")
    model: str | None = opt(None, "checkpoint directory of the policy to train (its tokenizer and chat template)")
    prompts: list[str] = opt(factory=list, help="JSONL files of {messages: [...]} or {prompt: text} rows (+ meta)")
    reward: list[str] = opt(factory=list, help="reward specs, NAME or NAME:ARG (e.g. model:rm/), several summed")
    reward_weights: list[float] = opt(factory=list, help="one weight per reward spec (default: 1 each)")
    verifiable: VerifiableRewardConfig = opt(factory=VerifiableRewardConfig, help="the ground-truth rewards' "
                                             "(world:DIR, facts) points per claim and abstention")
    lora: LoRAOptions | None = opt(None, "train a LoRA adapter (the reference is the model with it off); --lora for "
                                         "defaults")
    out: str | None = opt(None, "result directory: the adapter with --lora, else the model (default: "
                                "out_dir/adapter or out_dir/model)")
    rl: RLOptions = opt(factory=RLOptions, help="the RL algorithm's options")
    train: TrainConfig = opt(factory=TrainConfig, help="the trainer")


def _check(run: RLRun) -> tuple[RLConfig, list[tuple[str, str, float]]]:
    """Everything that can be checked before a model loads: the config, the files, the reward specs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("lucidlm rl runs in one process (its rollouts are not sharded over ranks)")
    config = RLConfig(algo=run.algo, **dataclasses.asdict(run.rl)).resolve()
    if run.model is None:
        raise ValueError("give the policy's checkpoint: --model DIR")
    if not run.prompts:
        raise ValueError("no prompts: give --prompts FILE[,FILE...]")
    if not run.reward:
        raise ValueError("no reward: give --reward SPEC[,SPEC...] (known: " + ", ".join(sorted(REWARDS)) + ")")
    weights = list(run.reward_weights) or [1.0] * len(run.reward)
    if len(weights) != len(run.reward):
        raise ValueError(f"{len(weights)} --reward-weights for {len(run.reward)} --reward specs")
    if run.lora is not None and run.lora.train_embeddings_norms:
        raise ValueError("--lora.train-embeddings-norms does not combine with rl: the reference is the model with "
                         "the adapters off, and the embedding and norms would stay trained")
    specs = [(*parse_reward_spec(s), w) for s, w in zip(run.reward, weights)]
    if run.verifiable != VerifiableRewardConfig() and not {name for name, _, _ in specs} & VERIFIABLE_REWARDS:
        raise ValueError("--verifiable.* options configure the ground-truth rewards, and no --reward spec is one of "
                         f"them ({', '.join(sorted(VERIFIABLE_REWARDS))})")
    ensure_writable_dir(run.train.out_dir)
    if run.out:
        ensure_writable_dir(Path(run.out).parent, "directory of --out")
    return config, specs


def run_rl(run: RLRun) -> tuple[dict, Path]:
    """Returns (last metrics, where the policy went)."""
    config, specs = _check(run)
    prompts = read_prompts(run.prompts)
    if config.prompts_per_step > len(prompts):  # before the model loads
        raise ValueError(f"--rl.prompts-per-step {config.prompts_per_step} exceeds the {len(prompts)} prompts in "
                         f"{run.prompts}")
    lm = load(run.model, dtype="float32", device=resolve_device(run.train.device), compile="off", quantize="none")
    if lm.tokenizer is None:
        raise ValueError(f"{run.model}: no tokenizer.json to encode the prompts with")
    rewards = [(build_reward(name, arg, lm, run.verifiable), weight) for name, arg, weight in specs]
    policy = lm.model
    if run.lora is not None:
        from ..model.lora import apply_lora, disabled

        torch.manual_seed(run.train.seed)  # the adapters' initial A comes from the run's seed
        apply_lora(policy, run.lora.to_config(policy))
        save_policy, load_policy = partial(_save_adapter, lm.family), partial(_load_adapter, lm.family)

        def reference(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with disabled(policy):
                return policy(ids, attention_mask=mask)
    else:
        reference = frozen_reference(policy)  # the initial policy, before any checkpoint is restored
        save_policy = partial(_with_tokenizer, partial(default_save_weights, family=lm.family), lm.tokenizer)
        load_policy = default_load_weights
    model = RLModel(policy, value_head=config.algo == "ppo", generator=torch.Generator().manual_seed(run.train.seed))
    source = RolloutSource(model, lm.generator(), prompts, rewards, config, reference)
    save, load_weights = rl_weights(save_policy, load_policy)
    info = {"kind": "rl", "model": str(Path(run.model).resolve()), "prompts": [str(Path(p).resolve())
                                                                              for p in run.prompts],
            "rewards": [[n, a, w] for n, a, w in specs], "verifiable": dataclasses.asdict(run.verifiable),
            "rl": dataclasses.asdict(config),
            "lora": _lora_info(run.lora)}
    trainer = Trainer(model, run.train, source, objective=RLObjective(config), save_weights=save,
                      load_weights=load_weights, run_info=info)
    last = trainer.fit()
    out_dir = Path(run.train.out_dir)
    plot_reward_curve(out_dir / "metrics.jsonl", out_dir / "reward_curve.png", f"lucidlm rl --algo {config.algo}")
    final = Path(run.out) if run.out else out_dir / ("adapter" if run.lora else "model")
    _export(trainer, final)
    return last, final
