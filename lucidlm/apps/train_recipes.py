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
from ..model.lora import TARGETS, LoRAConfig
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer, byte_tokenizer
from ..train.checkpointing import ensure_writable_dir
from ..train.config_file import opt
from ..train.pretrain_data import PackedTextDataset
from ..train.trainer import TrainConfig, Trainer, default_save_weights


@dataclass
class ModelSpec:
    init: str | None = opt(None, "checkpoint directory to start from; none: a new model from `preset`")
    preset: str = opt("llama-125m", "architecture of a new model (see `lucidlm info --preset NAME`)")
    family: str | None = opt(None, "Hugging Face layout a new model is saved in (model_type, e.g. llama, qwen3; "
                                   "default: llama, bert for an encoder preset)")
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
    val_percent: float = opt(1.0, "percent of documents held out for validation when val_data is empty (0: none)")
    tokenizer: str = opt("bytes", "directory with tokenizer.json, or `bytes` for the 259-token byte tokenizer")
    objective: str = opt("causal", "causal (next-token loss, a decoder) or mlm (masked LM: 15% of the tokens, an "
                                   "encoder such as --model.preset bert-base; see apps/mlm_pretrain.py)")
    block_size: int = opt(256, "tokens per training sequence")
    batch_size: int = opt(8, "sequences per micro-batch")
    model: ModelSpec = opt(factory=ModelSpec, help="the model")
    strategy: str = opt("ddp", "under torchrun: ddp (every rank holds the model) or fsdp (sharded, FSDP2)")
    train: TrainConfig = opt(factory=TrainConfig, help="the trainer")


@dataclass
class TokenizerRun:
    data: list[str] = opt(factory=list, help="text files or directories of .txt files to learn merges from")
    vocab_size: int = opt(8000, "tokens in the vocabulary (bytes + special tokens + merges)")
    out: str = opt("tokenizer", "directory to write tokenizer.json and tokenizer_config.json into")
    min_frequency: int = opt(2, "a pair must occur this often to be merged")
    model_max_length: int = opt(2048, "context length recorded in tokenizer_config.json")
    mlm: bool = opt(False, "a masked-LM tokenizer: [CLS] [SEP] [PAD] [MASK] special tokens, no chat template")


def run_tokenizer(run: TokenizerRun) -> Tokenizer:
    from ..train.tokenizer_training import train_bpe_tokenizer

    if not run.data:
        raise ValueError("no training text: give --data FILE[,FILE...]")
    if run.mlm:  # BERT's special tokens with their roles, no chat template
        from ..train.tokenizer_training import MLM_SPECIAL_TOKENS, MLM_TOKEN_ROLES

        return train_bpe_tokenizer(run.data, run.vocab_size, run.out, MLM_SPECIAL_TOKENS, chat_template=None,
                                   min_frequency=run.min_frequency, model_max_length=run.model_max_length,
                                   token_roles=MLM_TOKEN_ROLES)
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
    family = spec.family or "llama"
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    shape = {k: v for k, v in dataclasses.asdict(spec).items()
             if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len") and v is not None}
    cfg = from_preset(spec.preset, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(spec.seed))
    return model, FAMILIES[family]


def make_trainer(strategy: str, *args, **kwargs) -> Trainer:
    """A Trainer, or under torchrun (WORLD_SIZE > 1) a DistributedTrainer with ``strategy``."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..train.distributed import DistributedTrainer

        return DistributedTrainer(*args, strategy=strategy, **kwargs)
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    return Trainer(*args, **kwargs)


def _with_tokenizer(save, tokenizer: Tokenizer, model, directory: Path) -> None:
    save(model, directory)
    tokenizer.save(directory)  # every checkpoint is a complete, loadable model directory


def run_pretrain(run: PretrainRun) -> dict:
    if not run.data:
        raise ValueError("no training data: give --data FILE[,FILE...] (or data: [...] in the config file)")
    from .mlm_pretrain import check_objective, run_mlm_pretrain

    check_objective(run)  # mlm for an encoder, causal for a decoder: refused before anything is built
    if run.objective == "mlm":
        return run_mlm_pretrain(run)
    ensure_writable_dir(run.train.out_dir)  # before the model is built and the data read
    tokenizer = load_tokenizer(run.tokenizer)
    model, family = build_model(run.model, tokenizer)
    if run.block_size > model.config.max_seq_len:
        raise ValueError(f"block_size {run.block_size} exceeds the model's context {model.config.max_seq_len}")
    split = None if run.val_data else "train"
    train = PackedTextDataset(run.data, tokenizer, run.block_size, run.batch_size, split=split,
                              val_percent=run.val_percent)
    val = None  # val_percent 0 and no val_data: no validation
    if run.val_data or run.val_percent > 0:
        val_source = PackedTextDataset(run.val_data or run.data, tokenizer, run.block_size, run.batch_size, epochs=1,
                                       split=None if run.val_data else "val", val_percent=run.val_percent)
        val = list(itertools.islice(val_source, run.train.eval_batches))  # a fixed validation set
    save = partial(_with_tokenizer, partial(default_save_weights, family=family), tokenizer)
    info = {"kind": "pretrain", "model": model.config.to_dict(), "data": [str(p) for p in train.files],
            "block_size": run.block_size, "batch_size": run.batch_size, "tokenizer_vocab": tokenizer.vocab_size}
    trainer = make_trainer(run.strategy, model, run.train, train, val, save_weights=save, run_info=info)
    last = trainer.fit()
    if trainer.is_main:
        _export(trainer, Path(run.train.out_dir) / "model")
    return last


def _export(trainer: Trainer, final: Path) -> None:
    """Copy the last checkpoint's model files to ``out_dir/model`` (replacing an older export)."""
    from ..train.checkpointing import LEGACY_STATE_FILE, STATE_FILES, latest_checkpoint

    source = latest_checkpoint(trainer.out_dir)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*STATE_FILES, LEGACY_STATE_FILE))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)



# --- fine-tuning: SFT and DPO, full or LoRA ------------------------------------------------------
@dataclass
class LoRAOptions:
    r: int = opt(16, "LoRA rank")
    alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = opt(0.05, "dropout on the LoRA input")
    targets: list[str] = opt(factory=lambda: list(TARGETS), help="Linear layers to adapt")
    layers: list[int] | None = opt(None, "blocks to adapt (default: all)")
    use_rslora: bool = opt(False, "scale by alpha / sqrt(r) (rsLoRA)")
    train_embeddings_norms: bool = opt(False, "LongLoRA: also train the token embedding and every norm in full "
                                              "(saved in the adapter as PEFT's modules_to_save)")

    def to_config(self, model: Transformer | None = None) -> LoRAConfig:
        """The LoRAConfig; ``model`` names the embedding and norms that ``train_embeddings_norms`` trains."""
        from ..model.lora import longlora_modules

        if self.train_embeddings_norms and model is None:
            raise ValueError("LoRAOptions.train_embeddings_norms: to_config needs the model, whose modules it names")
        saved = longlora_modules(model) if self.train_embeddings_norms else ()
        return LoRAConfig(self.r, self.alpha, self.dropout, tuple(self.targets), self.layers, self.use_rslora, saved)


@dataclass
class BottleneckOptions:
    size: int = opt(64, "bottleneck width m of each adapter (2·dim·m + m + dim parameters per adapter)")
    activation: str = opt("gelu", "nonlinearity between the down and up projections (gelu, silu, relu, ...)")
    places: list[str] = opt(factory=lambda: ["attn", "mlp"], help="after the attention (attn) and/or the "
                                                                  "feed-forward (mlp) output")
    layers: list[int] | None = opt(None, "blocks to adapt (default: all)")
    train_norms: bool = opt(False, "also train every norm's weight (Houlsby et al.)")

    def to_config(self):
        from ..model.bottleneck_adapter import BottleneckConfig

        return BottleneckConfig(self.size, self.activation, tuple(self.places), self.layers, self.train_norms)


ADAPTERS = ("lora", "bottleneck")


@dataclass
class SFTRun:
    model: str | None = opt(None, "checkpoint directory to fine-tune (its tokenizer and chat template are used)")
    data: list[str] = opt(factory=list, help="JSONL files: {messages: [...]} or {prompt, response} rows")
    val_data: list[str] = opt(factory=list, help="validation JSONL files (optional)")
    max_len: int | None = opt(None, "tokens per example, longer ones truncated and counted (default: the context)")
    batch_size: int = opt(4, "examples per micro-batch (padded to the longest)")
    prefix_lm: bool = opt(False, "the prompt attends both ways (prefix-LM); the response stays causal")
    s2_attn_group: int | None = opt(None, "LongLoRA's S2-Attn while training: attend within groups of N tokens, half "
                                          "of the heads shifted by N/2 (batches padded to a multiple of N); the "
                                          "result runs full attention")
    skip_bad_lines: bool = opt(False, "skip (and count) malformed JSONL lines instead of stopping")
    lora: LoRAOptions | None = opt(None, "train a LoRA adapter instead of every weight (--lora for defaults)")
    adapter: str | None = opt(None, "lora or bottleneck: train that adapter instead of every weight "
                                    "(--adapter lora is --lora)")
    bottleneck: BottleneckOptions | None = opt(None, "Houlsby bottleneck adapters (--adapter bottleneck or "
                                                     "--bottleneck for defaults)")
    out: str | None = opt(None, "result directory: the adapter with LoRA (PEFT format) or bottleneck, else the model "
                                "(default: out_dir/adapter or out_dir/model)")
    strategy: str = opt("ddp", "under torchrun: ddp (every rank holds the model) or fsdp (sharded, FSDP2)")
    train: TrainConfig = opt(factory=TrainConfig, help="the trainer")


@dataclass
class DPORun(SFTRun):
    beta: float = opt(0.1, "DPO beta: how far the policy may move from the reference")
    label_smoothing: float = opt(0.0, "conservative DPO: probability that a preference label is flipped")


def _resolve_adapter(run: SFTRun) -> None:
    """``--adapter NAME`` as the section it names (its defaults unless options were given); one adapter at most."""
    if run.adapter is not None and run.adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {run.adapter!r}; choose from {list(ADAPTERS)}")
    if run.adapter == "lora" and run.lora is None:
        run.lora = LoRAOptions()
    if run.adapter == "bottleneck" and run.bottleneck is None:
        run.bottleneck = BottleneckOptions()
    chosen = [name for name in ADAPTERS if getattr(run, name) is not None]
    if len(chosen) > 1 or (run.adapter is not None and chosen != [run.adapter]):
        raise ValueError(f"one adapter at a time: --adapter {run.adapter} with options for {chosen}")


def _fine_tune_setup(run: SFTRun):
    _resolve_adapter(run)
    if run.model is None:
        raise ValueError("give the checkpoint to fine-tune: --model DIR")
    if not run.data:
        raise ValueError("no training data: give --data FILE[,FILE...]")
    ensure_writable_dir(run.train.out_dir)  # before the model is loaded
    if run.out:
        ensure_writable_dir(Path(run.out).parent, "directory of --out")  # the result is renamed into place there
    loaded = load_model(run.model, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(run.model)
    if tokenizer is None:
        raise ValueError(f"{run.model}: no tokenizer.json to encode the data with")
    if run.max_len is None:
        run.max_len = loaded.config.max_seq_len
    if run.max_len > loaded.config.max_seq_len:
        raise ValueError(f"max_len {run.max_len} exceeds the model's context {loaded.config.max_seq_len}")
    model, family = loaded.model, loaded.family
    if run.s2_attn_group is not None:
        _use_s2_attn(model, run)
    if run.lora is not None:
        from ..model.lora import apply_lora

        torch.manual_seed(run.train.seed)  # the adapters' initial A comes from the run's seed, nothing before it
        apply_lora(model, run.lora.to_config(model))
        save = partial(_save_adapter, family)
        load = partial(_load_adapter, family)
    elif run.bottleneck is not None:
        from ..checkpoint.bottleneck_adapter import fill_bottleneck_adapter, save_bottleneck_adapter
        from ..model.bottleneck_adapter import apply_bottleneck

        torch.manual_seed(run.train.seed)  # the adapters' initial W_down comes from the run's seed
        apply_bottleneck(model, run.bottleneck.to_config())
        save, load = save_bottleneck_adapter, fill_bottleneck_adapter
    else:
        save = partial(_with_tokenizer, partial(default_save_weights, family=family), tokenizer)
        load = None
    return model, family, tokenizer, save, load


def _use_s2_attn(model: Transformer, run: SFTRun) -> None:
    """S2-Attn for the training forwards (checked against the model's config); batches are padded to whole groups,
    so the longest one must still fit the context."""
    from ..model.shifted_sparse_attention import set_s2_attn_group

    group = run.s2_attn_group
    set_s2_attn_group(model, group)
    padded = -(-run.max_len // group) * group
    if padded > model.config.max_seq_len:
        raise ValueError(f"--s2-attn-group {group}: max_len {run.max_len} padded to whole groups is {padded} tokens, "
                         f"beyond the model's context {model.config.max_seq_len}; lower --max-len")


def _save_adapter(family, model, directory: Path) -> None:
    from ..checkpoint.peft_adapter import save_adapter

    save_adapter(model, family, directory)


def _load_adapter(family, model, directory: Path) -> None:
    from ..checkpoint.peft_adapter import fill_adapter

    fill_adapter(model, family, directory)


def _run_info(run: SFTRun, kind: str) -> dict:
    return {"kind": kind, "model": str(Path(run.model).resolve()), "data": [str(Path(d).resolve()) for d in run.data],
            "max_len": run.max_len, "batch_size": run.batch_size, "prefix_lm": run.prefix_lm,
            "lora": _lora_info(run.lora),
            # keys added later only when used, so that runs checkpointed before them still resume
            **({"bottleneck": dataclasses.asdict(run.bottleneck)} if run.bottleneck else {}),
            **({"s2_attn_group": run.s2_attn_group} if run.s2_attn_group is not None else {})}


def _lora_info(lora: LoRAOptions | None) -> dict | None:
    if lora is None:
        return None
    info = dataclasses.asdict(lora)
    if not info["train_embeddings_norms"]:  # added later: only when used
        del info["train_embeddings_norms"]
    return info


def _finish(trainer: Trainer, run: SFTRun) -> Path:
    default = "adapter" if run.lora is not None or run.bottleneck is not None else "model"
    final = Path(run.out) if run.out else Path(run.train.out_dir) / default
    if trainer.is_main:
        _export(trainer, final)
    return final


def run_sft(run: SFTRun) -> tuple[dict, Path, dict]:
    """Returns (last metrics, where the result went, data statistics)."""
    from ..train.sft_data import SFTDataset

    model, family, tokenizer, save, load = _fine_tune_setup(run)
    multiple = run.s2_attn_group or 1  # S2-Attn needs whole groups
    train = SFTDataset(run.data, tokenizer, run.max_len, run.batch_size, prefix_lm=run.prefix_lm,
                       skip_bad_lines=run.skip_bad_lines, pad_multiple=multiple)
    val = None
    if run.val_data:
        val = list(itertools.islice(SFTDataset(run.val_data, tokenizer, run.max_len, run.batch_size, epochs=1,
                                               prefix_lm=run.prefix_lm, pad_multiple=multiple), run.train.eval_batches))
    trainer = make_trainer(run.strategy, model, run.train, train, val, save_weights=save, load_weights=load,
                           run_info=_run_info(run, "sft"))
    last = trainer.fit()
    return last, _finish(trainer, run), {"truncated": train.truncated, "skipped_lines": len(train.skipped)}


def run_dpo(run: DPORun) -> tuple[dict, Path, dict]:
    from ..train.dpo import DPO, frozen_reference
    from ..train.sft_data import PreferenceDataset

    if run.s2_attn_group is not None:
        raise ValueError("--s2-attn-group is an sft option (DPO's preference batches are not padded to whole groups)")
    if run.lora is not None and run.lora.train_embeddings_norms:
        raise ValueError("--lora.train-embeddings-norms does not combine with dpo: its reference is the model with "
                         "the adapters off, and the embedding and norms would stay trained")
    model, family, tokenizer, save, load = _fine_tune_setup(run)
    if run.lora is not None:  # the reference is the same model with its adapters off: no second copy
        from ..model.lora import disabled

        def reference(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with disabled(model):
                return model(ids, attention_mask=mask)
    else:
        reference = frozen_reference(model)
    train = PreferenceDataset(run.data, tokenizer, run.max_len, run.batch_size, skip_bad_lines=run.skip_bad_lines)
    val = None
    if run.val_data:
        val = list(itertools.islice(PreferenceDataset(run.val_data, tokenizer, run.max_len, run.batch_size,
                                                      epochs=1), run.train.eval_batches))
    info = {**_run_info(run, "dpo"), "beta": run.beta, "label_smoothing": run.label_smoothing}
    trainer = make_trainer(run.strategy, model, run.train, train, val,
                           objective=DPO(reference, run.beta, run.label_smoothing), save_weights=save,
                           load_weights=load, run_info=info)
    last = trainer.fit()
    return last, _finish(trainer, run), {"truncated": train.formatter.truncated, "skipped_lines": len(train.skipped)}
