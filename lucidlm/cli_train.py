"""Training verbs: ``lucidlm pretrain`` (sft, dpo and tokenizer train follow), each driven by a run-config
dataclass — ``--config run.yaml`` plus one documented option per field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_config import config_command
from .train.recipes import DPORun, PretrainRun, SFTRun, TokenizerRun

tokenizer_app = typer.Typer(help="Tokenizers: train a byte-level BPE on your text.", no_args_is_help=True)


def _pretrain(run: PretrainRun) -> None:
    from .train.recipes import run_pretrain

    last = run_pretrain(run)
    typer.echo(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}))
    typer.echo(f"model: {run.train.out_dir}/model   loss curve: {run.train.out_dir}/loss_curve.png", err=True)


def corpus(
    out: Annotated[Path, typer.Argument(help="directory to write the .txt files into")],
    documents: Annotated[int, typer.Option(help="documents in all")] = 20000,
    files: Annotated[int, typer.Option(help="files to spread them over")] = 8,
    seed: Annotated[int, typer.Option(help="the same seed writes the same corpus")] = 0,
) -> None:
    """Write the generated English corpus (a made-up town) for pretraining without downloads."""
    from .train.corpus import write_corpus

    paths = write_corpus(out, documents, files, seed)
    size = sum(p.stat().st_size for p in paths)
    typer.echo(f"{len(paths)} files, {documents} documents, {size / 1e6:.1f} MB in {out}")


def _tokenizer(run: TokenizerRun) -> None:
    from .train.recipes import run_tokenizer

    tok = run_tokenizer(run)
    typer.echo(f"{tok.vocab_size} tokens -> {run.out}/tokenizer.json (+ tokenizer_config.json with a chat template)")


def _report(result) -> None:
    last, where, stats = result
    typer.echo(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}))
    typer.echo(f"result: {where}   data: {stats['truncated']} examples truncated, {stats['skipped_lines']} bad lines "
               "skipped", err=True)


def _sft(run: SFTRun) -> None:
    from .train.recipes import run_sft

    _report(run_sft(run))


def _dpo(run: DPORun) -> None:
    from .train.recipes import run_dpo

    _report(run_dpo(run))


def register(app: typer.Typer) -> None:
    app.command("sft")(config_command(
        SFTRun, _sft,
        "Supervised fine-tuning on JSONL conversations, loss on the assistant turns only; --lora trains a "
        "PEFT-format adapter instead of every weight.\n\n"
        "Example: lucidlm sft --model base/ --data chats.jsonl --lora --lora.r 8 --out adapter/"))
    app.command("dpo")(config_command(
        DPORun, _dpo,
        "Direct Preference Optimization on JSONL {prompt, chosen, rejected} rows; the reference is the starting "
        "model (frozen copy, or the adapter switched off with --lora).\n\n"
        "Example: lucidlm dpo --model sft/ --data pairs.jsonl --beta 0.1 --lora --out dpo-adapter/"))
    app.command("corpus")(corpus)
    tokenizer_app.command("train")(config_command(
        TokenizerRun, _tokenizer,
        "Train a byte-level BPE tokenizer (with special tokens and a ChatML template) that transformers' "
        "AutoTokenizer also loads.\n\nExample: lucidlm tokenizer train --data corpus/ --vocab-size 4000 --out tok/"))
    app.add_typer(tokenizer_app, name="tokenizer")
    app.command("pretrain")(config_command(
        PretrainRun, _pretrain,
        "Pretrain a language model on text files (packed blocks, next-token loss).\n\n"
        "Every option can also come from --config run.yaml (sections: model, train).\n"
        "Example: lucidlm pretrain --data corpus/ --model.dim 256 --model.n-layers 4 --train.max-steps 500"))
