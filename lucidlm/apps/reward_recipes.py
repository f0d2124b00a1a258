"""What ``lucidlm reward train`` and ``lucidlm reward eval`` do: preference pairs in, a reward model directory out
(train/reward_model.py); its pairwise accuracy on held-out pairs with a bootstrap interval."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.loader import load_model
from ..model.lora import apply_lora
from ..tokenizer import Tokenizer
from ..train.checkpointing import ensure_writable_dir
from ..train.config_file import opt
from ..train.reward_model import (
    BradleyTerry,
    RewardModel,
    RewardPairDataset,
    accuracy_ci,
    fill_reward_model,
    load_reward_model,
    pair_rewards,
    read_reward_config,
    save_reward_model,
)
from ..train.trainer import TrainConfig
from .train_recipes import LoRAOptions, _export, make_trainer


@dataclass
class RewardRun:
    model: str | None = opt(None, "checkpoint directory of the base model (its tokenizer and chat template are used)")
    data: list[str] = opt(factory=list, help="JSONL files of {prompt, chosen, rejected} rows (+ an optional margin)")
    val_data: list[str] = opt(factory=list, help="validation JSONL files (optional): val_loss is their mean BT loss")
    max_len: int | None = opt(None, "tokens per prompt + response, longer ones truncated (default: the context)")
    batch_size: int = opt(8, "pairs per micro-batch")
    skip_bad_lines: bool = opt(False, "skip (and count) malformed JSONL lines instead of stopping")
    lora: LoRAOptions | None = opt(None, "also train a LoRA adapter on the base (--lora for defaults); without it "
                                         "only the head trains")
    out: str | None = opt(None, "the reward model directory (default: out_dir/reward)")
    train: TrainConfig = opt(factory=TrainConfig, help="the trainer")


def _tokenizer(model_dir: str) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer.json to encode the pairs with")
    return tokenizer


def run_reward_train(run: RewardRun) -> tuple[dict, Path, dict]:
    """Returns (last metrics, the reward model directory, data statistics)."""
    if run.model is None:
        raise ValueError("give the base model: --model DIR")
    if not run.data:
        raise ValueError("no training data: give --data FILE[,FILE...]")
    ensure_writable_dir(run.train.out_dir)  # before the model is loaded
    final = Path(run.out) if run.out else Path(run.train.out_dir) / "reward"
    ensure_writable_dir(final.parent, "directory of --out")
    loaded = load_model(run.model, dtype=torch.float32)
    tokenizer = _tokenizer(run.model)
    max_len = run.max_len or loaded.config.max_seq_len
    if max_len > loaded.config.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's context {loaded.config.max_seq_len}")
    base = loaded.model
    if run.lora is not None:
        torch.manual_seed(run.train.seed)  # the adapters' initial A comes from the run's seed
        apply_lora(base, run.lora.to_config())
    model = RewardModel(base, generator=torch.Generator().manual_seed(run.train.seed))
    base_path = str(Path(run.model).resolve())

    def save(m: RewardModel, directory: Path) -> None:
        save_reward_model(m, directory, loaded.family, base_path)

    def load(m: RewardModel, directory: Path) -> None:
        fill_reward_model(m, directory, loaded.family)

    train = RewardPairDataset(run.data, tokenizer, max_len, run.batch_size, skip_bad_lines=run.skip_bad_lines)
    val = None
    if run.val_data:
        val = list(itertools.islice(RewardPairDataset(run.val_data, tokenizer, max_len, run.batch_size, epochs=1),
                                    run.train.eval_batches))
    info = {"kind": "reward", "model": base_path, "data": [str(Path(d).resolve()) for d in run.data],
            "max_len": max_len, "batch_size": run.batch_size,
            "lora": dataclasses.asdict(run.lora) if run.lora else None}
    trainer = make_trainer("ddp", model, run.train, train, val, objective=BradleyTerry(), save_weights=save,
                           load_weights=load, run_info=info)
    last = trainer.fit()
    if trainer.is_main:
        _export(trainer, final)
    return last, final, {"truncated": train.formatter.truncated, "skipped_lines": len(train.skipped)}


def run_reward_eval(reward: str, data: list[str], model: str | None = None, batch_size: int = 8,
                    max_len: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pairwise accuracy (chosen scored above rejected) of the reward model on ``data``, with its 95% bootstrap
    interval over pairs. ``model``: the base model's directory (default: where the reward model recorded it)."""
    missing = [d for d in data if not Path(d).is_file()]
    if not data or missing:
        raise FileNotFoundError(f"preference JSONL files not found: {missing}" if missing else "no --data given")
    config = read_reward_config(reward)
    model = model or config.base_model
    if model is None:
        raise ValueError(f"{reward}: no base model recorded; give it with --model DIR")
    loaded = load_model(model, dtype=torch.float32)
    rm = load_reward_model(reward, loaded.model, loaded.family)
    max_len = min(max_len or loaded.config.max_seq_len, loaded.config.max_seq_len)
    pairs = RewardPairDataset(data, _tokenizer(model), max_len, batch_size, epochs=1)
    chosen, rejected = pair_rewards(rm, pairs)
    return {**accuracy_ci(chosen, rejected, n_boot, seed), "reward": str(reward), "model": str(model),
            "data": [str(d) for d in data]}
