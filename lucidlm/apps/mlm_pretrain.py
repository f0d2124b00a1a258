"""``lucidlm pretrain --objective mlm``: an encoder-only masked LM (BERT) pretrained on text files.

The data are the causal pretraining's packed blocks (documents joined with the tokenizer's EOS, [SEP] for a
masked-LM tokenizer: RoBERTa's full-sentence packing, no next-sentence task), each batch masked by
``train/masked_lm.py`` (15%; 80/10/10) with the run's seed; the loss is the original token's cross entropy
at the chosen positions. The model is a ``MaskedLM`` from an encoder preset (``bert-base``, ``bert-large``,
shrunk by the --model.* overrides) or a bert checkpoint (--model.init); checkpoints and ``out_dir/model``
are in the bert layout with the tokenizer, loadable by ``lucidlm.load_encoder`` and transformers'
``BertForMaskedLM``. ``--tokenizer bytes`` gives the byte tokenizer with [CLS] [SEP] [PAD] [MASK].
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import torch

from ..checkpoint.bert import ENCODER_MODEL_TYPES
from ..checkpoint.encoder_loader import load_encoder_model, save_encoder_model
from ..checkpoint.files import has_file, read_json
from ..model.encoder import PRESETS, MaskedLM, encoder_preset
from ..tokenizer import Tokenizer, byte_tokenizer
from ..train.checkpointing import ensure_writable_dir
from ..train.masked_lm import MaskedBatches, MaskedLMObjective, TokenMasker
from ..train.pretrain_data import PackedTextDataset
from ..train.tokenizer_training import MLM_SPECIAL_TOKENS, MLM_TOKEN_ROLES
from .train_recipes import ModelSpec, PretrainRun, _export, _with_tokenizer, load_tokenizer, make_trainer

OBJECTIVES = ("causal", "mlm")
ENCODER_PRESETS = tuple(sorted(PRESETS))
# ModelSpec's shape overrides, by EncoderConfig's names (BERT has no grouped key/value heads)
SHAPE_FIELDS = {"dim": "d_model", "n_layers": "n_layers", "n_heads": "n_heads", "ffn_dim": "ffn_dim",
                "max_seq_len": "max_len"}


def is_encoder(spec: ModelSpec) -> bool:
    """Whether the model to train is an encoder: a bert checkpoint to start from, or an encoder preset."""
    if spec.init is not None:
        return has_file(spec.init, "config.json") and read_json(spec.init, "config.json").get(
            "model_type") in ENCODER_MODEL_TYPES
    return spec.preset in PRESETS


def check_objective(run: PretrainRun) -> None:
    """The objective fits the model: next-token loss for a causal LM, masked LM for an encoder."""
    if run.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {run.objective!r}")
    spec, encoder = run.model, is_encoder(run.model)
    model = f"--model.init {spec.init}" if spec.init is not None else f"--model.preset {spec.preset}"
    if run.objective == "mlm" and not encoder:
        raise ValueError(f"--objective mlm trains an encoder-only masked LM, but {model} is a causal LM: choose an "
                         f"encoder preset ({', '.join(ENCODER_PRESETS)}) or --model.init a bert checkpoint")
    if run.objective == "causal" and encoder:
        raise ValueError(f"{model} is an encoder-only masked LM: it has no next-token loss (its attention sees "
                         "both ways); pretrain it with --objective mlm")
    if encoder and spec.family not in (None, "bert"):
        raise ValueError(f"an encoder is saved in the bert layout; --model.family {spec.family!r} is a causal LM's")
    if encoder and spec.n_kv_heads is not None:
        raise ValueError("--model.n-kv-heads: an encoder (BERT) has one key/value head per query head")


def mlm_tokenizer(spec: str) -> Tokenizer:
    """The run's tokenizer, which needs a mask token: ``bytes`` gets [CLS] [SEP] [PAD] [MASK] as its specials."""
    if spec != "bytes":
        tokenizer = load_tokenizer(spec)
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{spec}: the tokenizer has no mask token (tokenizer_config.json mask_token), which "
                             "--objective mlm needs: train one with `lucidlm tokenizer train --mlm`")
        return tokenizer
    tokenizer = byte_tokenizer(MLM_SPECIAL_TOKENS)
    tokenizer.config.update(MLM_TOKEN_ROLES)
    return tokenizer


def build_encoder(spec: ModelSpec, tokenizer: Tokenizer) -> MaskedLM:
    """A MaskedLM in float32: the checkpoint's, or a new one from the preset with the overrides."""
    if spec.init is not None:
        model = load_encoder_model(spec.init, dtype=torch.float32).model
        if model.config.vocab_size <= tokenizer.max_token_id():
            raise ValueError(f"{spec.init}: vocab_size {model.config.vocab_size} is too small for the tokenizer "
                             f"(ids up to {tokenizer.max_token_id()})")
        return model
    shape = {ours: getattr(spec, theirs) for theirs, ours in SHAPE_FIELDS.items() if getattr(spec, theirs) is not None}
    cfg = encoder_preset(spec.preset, vocab_size=tokenizer.max_token_id() + 1, pad_token_id=tokenizer.pad_token_id,
                         **shape)
    model = MaskedLM(cfg)
    model.init_weights(torch.Generator().manual_seed(spec.seed))
    return model


def _save_encoder(model: MaskedLM, directory: Path) -> None:
    save_encoder_model(model, directory)


def _load_encoder(model: MaskedLM, directory: Path) -> None:
    state = load_encoder_model(directory, dtype=next(model.parameters()).dtype).model.state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(state[name])


def run_mlm_pretrain(run: PretrainRun) -> dict:
    ensure_writable_dir(run.train.out_dir)  # before the model is built and the data read
    tokenizer = mlm_tokenizer(run.tokenizer)
    model = build_encoder(run.model, tokenizer)
    if run.block_size > model.config.max_len:
        raise ValueError(f"block_size {run.block_size} exceeds the encoder's {model.config.max_len} positions")
    masker = TokenMasker.from_tokenizer(tokenizer)
    split = None if run.val_data else "train"
    packed = PackedTextDataset(run.data, tokenizer, run.block_size, run.batch_size, split=split,
                               val_percent=run.val_percent)
    train = MaskedBatches(packed, masker, run.train.seed)
    val = None
    if run.val_data or run.val_percent > 0:  # a fixed validation set, masked by a stream of its own
        source = PackedTextDataset(run.val_data or run.data, tokenizer, run.block_size, run.batch_size, epochs=1,
                                   split=None if run.val_data else "val", val_percent=run.val_percent)
        val = list(itertools.islice(MaskedBatches(source, masker, run.train.seed + 1), run.train.eval_batches))
    info = {"kind": "pretrain-mlm", "model": model.config.to_dict(), "data": [str(p) for p in packed.files],
            "block_size": run.block_size, "batch_size": run.batch_size, "tokenizer_vocab": tokenizer.vocab_size,
            "masking": vars(masker.config)}
    trainer = make_trainer(run.strategy, model, run.train, train, val, objective=MaskedLMObjective(),
                           save_weights=partial(_with_tokenizer, _save_encoder, tokenizer),
                           load_weights=_load_encoder, run_info=info)
    last = trainer.fit()
    if trainer.is_main:
        _export(trainer, Path(run.train.out_dir) / "model")
    return last
