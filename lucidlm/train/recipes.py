"""What ``lucidlm pretrain`` (and the other training verbs) do: a run config in, a trained checkpoint out.

Each run is one dataclass (every field documented: it is also the verb's ``--help``), read from a
YAML/TOML file and the command line (see ``config_file.py``). ``out_dir`` receives checkpoints,
metrics.jsonl and loss_curve.png while training, and ``out_dir/model`` the final model in the Hugging
Face layout with its tokenizer — loadable by ``lucidlm.load``, ``lucidlm generate`` and transformers.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..checkpoint.loader import FAMILIES, load_model
from ..config import from_preset
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer, byte_tokenizer
from .config_file import opt
from .pretrain_data import PackedTextDataset
from .trainer import TrainConfig, Trainer, default_save_weights


@dataclass
class ModelSpec:
    init: str | None = opt(None, "checkpoint directory to start from; none: a new model from `preset`")
    preset: str = opt("llama-125m", "architecture of a new model (see `lucidlm info --preset NAME`)")
    family: str = opt("llama", "Hugging Face layout a new model is saved in (model_type, e.g. llama, qwen3)")
    dim: int | None = opt(None, "hidden size (overrides the preset)")
    n_layers: int | None = opt(None, "blocks (overrides the preset)")
    n_heads: int | None = opt(None, "attention heads (overrides the preset)")
    n_kv_heads: int | None = opt(None, "key/value heads (overrides the preset)")
    ffn_dim: int | None = opt(None, "feed-forward size (overrides the preset)")
    max_seq_len: int | None = opt(None, "context length (overrides the preset)")
    seed: int = opt(0, "seed of a new model's initial weights")


@dataclass
class PretrainRun:
    data: list[str] = opt(factory=list, help="text files or directories of .txt files (blank lines separate documents)")
    val_data: list[str] = opt(factory=list, help="validation text files; none: hold out val_percent of `data`")
    val_percent: float = opt(1.0, "percent of documents held out for validation when val_data is empty")
    tokenizer: str = opt("bytes", "directory with tokenizer.json, or `bytes` for the 259-token byte tokenizer")
    block_size: int = opt(256, "tokens per training sequence")
    batch_size: int = opt(8, "sequences per micro-batch")
    model: ModelSpec = opt(factory=ModelSpec, help="the model")
    train: TrainConfig = opt(factory=TrainConfig, help="the trainer")


@dataclass
class TokenizerRun:
    data: list[str] = opt(factory=list, help="text files or directories of .txt files to learn merges from")
    vocab_size: int = opt(8000, "tokens in the vocabulary (bytes + special tokens + merges)")
    out: str = opt("tokenizer", "directory to write tokenizer.json and tokenizer_config.json into")
    min_frequency: int = opt(2, "a pair must occur this often to be merged")
    model_max_length: int = opt(2048, "context length recorded in tokenizer_config.json")


def run_tokenizer(run: TokenizerRun) -> Tokenizer:
    from .tokenizer_training import train_bpe_tokenizer

    if not run.data:
        raise ValueError("no training text: give --data FILE[,FILE...]")
    return train_bpe_tokenizer(run.data, run.vocab_size, run.out, min_frequency=run.min_frequency,
                               model_max_length=run.model_max_length)


def load_tokenizer(spec: str) -> Tokenizer:
    if spec == "bytes":
        return byte_tokenizer()
    tok = Tokenizer.from_dir(spec)
    if tok is None:
        raise FileNotFoundError(f"{spec}: no tokenizer.json (make one with `lucidlm tokenizer train`)")
    return tok


def build_model(spec: ModelSpec, tokenizer: Tokenizer) -> tuple[Transformer, object]:
    """(model in float32, checkpoint family)."""
    if spec.init is not None:
        loaded = load_model(spec.init, dtype=torch.float32)
        if loaded.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{spec.init}: vocab_size {loaded.config.vocab_size} < the tokenizer's "
                             f"{tokenizer.vocab_size}")
        return loaded.model, loaded.family
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}; known: {sorted(FAMILIES)}")
    shape = {k: v for k, v in dataclasses.asdict(spec).items()
             if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len") and v is not None}
    cfg = from_preset(spec.preset, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(spec.seed))
    return model, FAMILIES[spec.family]


def _with_tokenizer(save, tokenizer: Tokenizer, model, directory: Path) -> None:
    save(model, directory)
    tokenizer.save(directory)  # every checkpoint is a complete, loadable model directory


def run_pretrain(run: PretrainRun) -> dict:
    if not run.data:
        raise ValueError("no training data: give --data FILE[,FILE...] (or data: [...] in the config file)")
    tokenizer = load_tokenizer(run.tokenizer)
    model, family = build_model(run.model, tokenizer)
    if run.block_size > model.config.max_seq_len:
        raise ValueError(f"block_size {run.block_size} exceeds the model's context {model.config.max_seq_len}")
    split = None if run.val_data else "train"
    train = PackedTextDataset(run.data, tokenizer, run.block_size, run.batch_size, split=split,
                              val_percent=run.val_percent)
    val_source = PackedTextDataset(run.val_data or run.data, tokenizer, run.block_size, run.batch_size, epochs=1,
                                   split=None if run.val_data else "val", val_percent=run.val_percent)
    val = list(itertools.islice(val_source, run.train.eval_batches))  # a fixed validation set
    save = partial(_with_tokenizer, partial(default_save_weights, family=family), tokenizer)
    info = {"kind": "pretrain", "model": model.config.to_dict(), "data": [str(p) for p in train.files],
            "block_size": run.block_size, "batch_size": run.batch_size, "tokenizer_vocab": tokenizer.vocab_size}
    trainer = Trainer(model, run.train, train, val, save_weights=save, run_info=info)
    last = trainer.fit()
    final = Path(run.train.out_dir) / "model"
    _export(trainer, final)
    return last


def _export(trainer: Trainer, final: Path) -> None:
    """Copy the last checkpoint's model files to ``out_dir/model`` (replacing an older export)."""
    from .checkpointing import STATE_FILE, latest_checkpoint

    source = latest_checkpoint(trainer.out_dir)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)

