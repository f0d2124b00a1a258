"""The RL run's training data: rollouts sampled with the inference engine, scored, turned into trainer batches.

One rollout step (index k):

    draw prompts_per_step prompts (seeded by (seed, k, attempt)) ─▶ the engine samples group_size responses
    per prompt (batched, the library's sampler, seed per step) ─▶ Rollouts ─▶ Σ weight·reward ─▶ overlong shaping
    ─▶ [dynamic sampling: drop all-equal groups, draw more prompts until the step is full or attempts run out]
    ─▶ old log-probs (and values) of the policy, the reference's log-probs ─▶ advantages
    ─▶ ppo_epochs × minibatches trainer batches

Advantages: GRPO/DAPO, each response's group-normalised reward on all its tokens; PPO, GAE on the value head's
values with InstructGPT's per-token rewards (−β·KL(π_old‖π_ref) on every token, the score on the last).
The log-probs are recomputed by a full forward of the policy, not taken from the engine (as verl does): the
ratio then starts at exactly 1, whatever the batched decode's rounding; the two agree to float tolerance.

Iterating yields batches lazily: a step's responses come from the weights the trainer has at that moment.
``state_dict`` (rollout steps done + the batches of the current rollout still to train on) makes a resumed run
sample, score and train exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generate.events import Completion
from ..generate.generation_config import GenerationConfig
from ..generate.offline import Generator
from ..jsonl import DataError, read_rows
from ..tokenizer import Tokenizer, pad_id
from .dpo import Reference
from .rewards import Reward, RLPrompt, Rollout
from .rl import RLConfig, RLModel, token_logprobs
from .rl_losses import (
    dynamic_sampling_keep,
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped_rewards,
    overlong_reward_shaping,
    whiten,
)
from .sft_data import messages_field, text_field

Batch = dict[str, torch.Tensor | dict[str, float]]


# --- prompts ---------------------------------------------------------------------------------------
def parse_prompt(row: dict) -> RLPrompt:
    """A prompts.jsonl row: {"messages": [...]} or {"prompt": "..."}, plus an optional object "meta"."""
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"field 'meta' must be an object, got {type(meta).__name__}")
    if "messages" in row:
        return RLPrompt(messages=tuple(messages_field(row)), meta=meta)
    text = text_field(row, "prompt")
    if not text:
        raise DataError("field 'prompt' is empty")
    return RLPrompt(text=text, meta=meta)


def read_prompts(files: Sequence[str | Path]) -> list[RLPrompt]:
    """Every prompt of the JSONL files; missing files, bad rows (file:line) and no prompt at all are errors."""
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"prompt files not found: {missing}" if missing else "no prompt files given")
    prompts = [p for path in paths for _, p in read_rows(path, 0, parse_prompt, False, lambda _: None)]
    if not prompts:
        raise ValueError(f"no prompts in {[str(p) for p in paths]}")
    return prompts


def encode_prompt(prompt: RLPrompt, tokenizer: Tokenizer | None) -> list[int]:
    """Token ids: chat messages through the tokenizer's chat template (with the assistant's generation prompt),
    a text prompt as it is.

    The prompt boundary: a template whose generation prompt ends in a space ("A: ") would end the prompt in a lone
    space token, where a byte-level BPE writes that space into the answer's first word (" I"): the model never
    saw the space alone there, in its corpus or in SFT/DPO's rendering of the same conversation (which tokenizes
    the whole turn). The trailing spaces are left to the answer, as the corpus writes them."""
    if tokenizer is None:
        raise ValueError("RL prompts are text: the model needs a tokenizer")
    if prompt.messages:
        if tokenizer.chat_template is None:
            raise ValueError("'messages' prompts need a chat template; the tokenizer has none")
        head = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True)
        return tokenizer.encode(head.rstrip(" "), add_special_tokens=False)
    return tokenizer.encode(prompt.text)


def prompt_options(prompt: RLPrompt, max_new_tokens: int) -> dict:
    """A prompt's own generation limits from its meta (the facts prompts carry their type's): "max_new_tokens"
    (capped at ``max_new_tokens``, the run's) and "stop" strings; without them, ``max_new_tokens`` and none."""
    own = prompt.meta.get("max_new_tokens", max_new_tokens)
    stop = prompt.meta.get("stop", [])
    if not isinstance(own, int) or isinstance(own, bool) or own < 1:
        raise ValueError(f"prompt meta 'max_new_tokens' must be an integer >= 1, got {own!r}")
    if not isinstance(stop, list | tuple) or not all(isinstance(x, str) and x for x in stop):
        raise ValueError(f"prompt meta 'stop' must be a list of non-empty strings, got {stop!r}")
    return {"max_new_tokens": min(own, max_new_tokens), "stop": tuple(stop)}


# --- one rollout round -----------------------------------------------------------------------------
@dataclass
class Scored:
    """One round's responses, group by group (rows [g·k, (g+1)·k) are prompt g's)."""

    prompt_index: list[int]  # per response: which prompt
    completions: list[Completion]
    rewards: torch.Tensor  # (n,) Σ weight · reward
    by_source: dict[str, torch.Tensor]  # name -> (n,)
    shaped: torch.Tensor  # (n,) rewards + the overlong penalty: what the advantages come from


def derived_seed(*parts: int) -> int:
    """A seed in [0, 2**62) from integers (so seed + sample index stays a valid torch seed)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 30 ^ int(state[1])) % 2**62


class RolloutSource:
    """An endless iterable of trainer batches, sampled from ``model.policy`` by ``generator``'s engine.

    rewards: (reward, weight) pairs, summed. reference: the reference policy's logits (train/dpo.py's ``Reference``:
    a frozen copy, or the LoRA model with its adapters off)."""

    def __init__(self, model: RLModel, generator: Generator, prompts: Sequence[RLPrompt],
                 rewards: Sequence[tuple[Reward, float]], config: RLConfig, reference: Reference) -> None:
        self.config = config = config.resolve()
        if generator.model is not model.policy:
            raise ValueError("the generator must sample from the policy being trained (generator.model is not "
                             "model.policy)")
        if config.algo == "ppo" and model.value_head is None:
            raise ValueError("ppo needs a value head: RLModel(policy, value_head=True)")
        if not prompts:
            raise ValueError("no prompts to roll out")
        if config.prompts_per_step > len(prompts):
            raise ValueError(f"prompts_per_step ({config.prompts_per_step}) exceeds the {len(prompts)} prompts given "
                             "(a step draws distinct prompts)")
        if not rewards:
            raise ValueError("no reward given")
        names = [r.name for r, _ in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards need distinct names, got {names}")
        for reward, weight in rewards:
            if not math.isfinite(weight):
                raise ValueError(f"reward {reward.name!r}: weight must be finite, got {weight}")
        self.model, self.generator, self.reference = model, generator, reference
        self.prompts, self.rewards = list(prompts), list(rewards)
        self.prompt_ids = [encode_prompt(p, generator.tokenizer) for p in self.prompts]
        self.options = [prompt_options(p, config.max_new_tokens) for p in self.prompts]
        limit = model.config.max_seq_len
        for i, ids in enumerate(self.prompt_ids):
            if not ids or len(ids) + config.max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(ids)} tokens: with max_new_tokens {config.max_new_tokens} "
                                 f"it must fit the model's context of {limit}")
        self.stops = set(generator.eos_token_ids)
        self.pad = pad_id(generator.tokenizer)
        self.rollouts = 0  # rollout steps done
        self.pending: list[Batch] = []  # batches of the last rollout not yet trained on

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts, self.pending = int(state["rollouts"]), list(state["pending"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if not self.pending:
                self.pending = self.rollout()
            yield self.pending.pop(0)

    # --- seeds ---------------------------------------------------------------------------------------
    def sampling_seed(self, step: int, attempt: int = 0) -> int:
        """The engine's seed of rollout ``step``'s round ``attempt``: sample j of a prompt draws with seed + j."""
        return derived_seed(self.config.seed, step, attempt, 1)

    def draw(self, step: int, attempt: int = 0) -> list[int]:
        """The prompts of a round: prompts_per_step distinct indices, from the seed and the step alone."""
        rng = np.random.default_rng(derived_seed(self.config.seed, step, attempt, 0))
        return rng.choice(len(self.prompts), self.config.prompts_per_step, replace=False).tolist()

    def generation_config(self, prompt: int, seed: int) -> GenerationConfig:
        cfg = self.config
        return GenerationConfig.from_kwargs(**self.options[prompt], temperature=cfg.temperature, top_p=cfg.top_p,
                                            seed=seed)

    # --- a rollout step ------------------------------------------------------------------------------
    def rollout(self) -> list[Batch]:
        """Sample, score and batch one step; the batches of its ppo_epochs × minibatches optimizer steps."""
        cfg, step = self.config, self.rollouts
        rounds: list[Scored] = []
        kept: list[tuple[Scored, int]] = []  # (round, group index) of the groups trained on
        equal = 0  # groups whose rewards were all equal
        attempts = cfg.max_sampling_attempts if cfg.dynamic_sampling else 1
        for attempt in range(attempts):
            scored = self.sample_round(step, attempt)
            rounds.append(scored)
            keep = dynamic_sampling_keep(scored.shaped, cfg.group_size) if cfg.dynamic_sampling else None
            varied = [keep is None or bool(keep[g * cfg.group_size]) for g in range(cfg.prompts_per_step)]
            equal += varied.count(False)
            kept += [(scored, g) for g, v in enumerate(varied) if v]
            if len(kept) >= cfg.prompts_per_step:
                break
        # every group all-equal in every round: train on the last round (no advantage; the KL term only)
        kept = kept[:cfg.prompts_per_step] or [(rounds[-1], g) for g in range(cfg.prompts_per_step)]
        batch = self._batch(kept)
        metrics = self._metrics(rounds, equal)
        self.rollouts += 1
        return self._minibatches(batch, metrics, step)

    @torch.no_grad()
    def sample_round(self, step: int, attempt: int) -> Scored:
        cfg = self.config
        chosen = self.draw(step, attempt)
        policy = self.model.policy
        was_training = policy.training
        policy.eval()  # no LoRA dropout while sampling: the responses come from the policy the log-probs score
        try:
            seed = self.sampling_seed(step, attempt)
            completions = self.generator.generate([self.prompt_ids[i] for i in chosen],
                                                  [self.generation_config(i, seed) for i in chosen], n=cfg.group_size)
        finally:
            policy.train(was_training)
        prompt_index = [i for i in chosen for _ in range(cfg.group_size)]
        rollouts = [self._as_rollout(i, c) for i, c in zip(prompt_index, completions)]
        by_source = {reward.name: self._score(reward, rollouts) for reward, _ in self.rewards}
        total = sum(w * by_source[r.name] for r, w in self.rewards)
        shaped = total
        if cfg.overlong:
            lengths = torch.tensor([len(c.token_ids) for c in completions])
            shaped = total + overlong_reward_shaping(lengths, cfg.max_new_tokens, cfg.overlong_cache)
        return Scored(prompt_index, completions, total, by_source, shaped)

    def _as_rollout(self, prompt: int, completion: Completion) -> Rollout:
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and ids and ids[-1] in self.stops:
            ids = ids[:-1]  # the reward sees the answer, not its EOS (which is trained: the policy learns to stop)
        return Rollout(self.prompts[prompt], tuple(self.prompt_ids[prompt]), tuple(ids), completion.text or "",
                       completion.finish_reason)

    @staticmethod
    def _score(reward: Reward, rollouts: list[Rollout]) -> torch.Tensor:
        values = list(reward(rollouts))
        if len(values) != len(rollouts):
            raise ValueError(f"reward {reward.name!r} returned {len(values)} scores for {len(rollouts)} responses")
        bad = [v for v in values if not isinstance(v, int | float) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward {reward.name!r} returned non-finite or non-numeric scores: {bad[:3]}")
        return torch.tensor(values, dtype=torch.float32)

    # --- the batch -----------------------------------------------------------------------------------
    def _batch(self, kept: list[tuple[Scored, int]]) -> dict[str, torch.Tensor]:
        cfg, k = self.config, self.config.group_size
        rows = [(s, g * k + j) for s, g in kept for j in range(k)]
        seqs = [self.prompt_ids[s.prompt_index[r]] + list(s.completions[r].token_ids) for s, r in rows]
        starts = [len(self.prompt_ids[s.prompt_index[r]]) for s, r in rows]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([x + [self.pad] * (width - len(x)) for x in seqs])
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
        target = torch.arange(1, width)[None]  # (1, s − 1): the position each target token sits at
        lengths = torch.tensor([len(x) for x in seqs])[:, None]
        response = ((target >= torch.tensor(starts)[:, None]) & (target < lengths)).float()  # (b, s − 1)
        old_logp, values = self._forward(ids, attention)
        ref_logp = self._reference(ids, attention)
        batch = {"input_ids": ids, "attention_mask": attention, "response_mask": response,
                 "old_logp": old_logp * response, "ref_logp": ref_logp * response}
        shaped = torch.stack([s.shaped[r] for s, r in rows])
        if cfg.algo == "ppo":
            kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator)
            rewards = kl_shaped_rewards(shaped, kl, response, cfg.kl_beta)
            advantages, returns = gae(rewards, values, response, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, response)
            batch.update(advantages=advantages, old_values=values * response, returns=returns)
        else:
            advantages = group_advantages(shaped, k, cfg.normalize_std)
            batch["advantages"] = advantages[:, None] * response
        return batch

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampling policy's log-probs (b, s − 1) and, with a value head, values (b, s − 1), in eval mode."""
        model, device = self.model, next(self.model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            logits, values = model(ids.to(device), attention.to(device))
        finally:
            model.train(was_training)
        logp = token_logprobs(logits, ids.to(device), self.config.temperature).cpu()
        return logp, None if values is None else values[:, :-1].cpu()

    @torch.no_grad()
    def _reference(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        logits = self.reference(ids.to(device), attention.to(device))
        return token_logprobs(logits, ids.to(device), self.config.temperature).cpu()

    def _minibatches(self, batch: dict[str, torch.Tensor], metrics: dict[str, float], step: int) -> list[Batch]:
        """ppo_epochs passes over the rollout, each split into ``minibatches`` row sets (shuffled per pass when
        there are several), each trimmed to its longest sequence."""
        cfg = self.config
        n = batch["input_ids"].shape[0]
        out: list[Batch] = []
        for epoch in range(cfg.ppo_epochs):
            order = torch.arange(n)
            if cfg.minibatches > 1:
                rng = np.random.default_rng(derived_seed(cfg.seed, step, epoch, 2))
                order = torch.from_numpy(rng.permutation(n))
            for rows in order.tensor_split(cfg.minibatches):
                part = {k: v[rows] for k, v in batch.items()}
                width = int(part["attention_mask"].sum(-1).max())
                part = {k: v[:, :width] if k in ("input_ids", "attention_mask") else v[:, :width - 1]
                        for k, v in part.items()}
                out.append({**part, "rollout_metrics": dict(metrics)})
        return out

    def _metrics(self, rounds: list[Scored], equal_groups: int) -> dict[str, float]:
        """What the step sampled: mean reward (total and per source) over every response of every round, response
        length, the share cut at max_new_tokens, the overlong penalty, and the groups dynamic sampling dropped."""
        cfg = self.config
        completions = [c for s in rounds for c in s.completions]
        groups = len(rounds) * cfg.prompts_per_step
        metrics = {"reward": float(torch.cat([s.rewards for s in rounds]).mean()),
                   "response_len": sum(len(c.token_ids) for c in completions) / len(completions),
                   "cut_at_max_len": sum(c.finish_reason == "length" for c in completions) / len(completions)}
        for reward, _ in self.rewards:
            metrics[f"reward_{reward.name}"] = float(torch.cat([s.by_source[reward.name] for s in rounds]).mean())
        if cfg.overlong:
            metrics["overlong_penalty"] = float(torch.cat([s.shaped - s.rewards for s in rounds]).mean())
        if cfg.dynamic_sampling:
            metrics.update(groups_dropped=equal_groups / groups, sampling_rounds=float(len(rounds)))
        return metrics

