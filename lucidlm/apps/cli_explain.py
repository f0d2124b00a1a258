"""``lucidlm explain <concept>``: a concept of the notes, simulated and measured on a real model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

explain_app = typer.Typer(help="A concept of the notes, simulated and then measured on a real model.",
                          no_args_is_help=True)


def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise typer.BadParameter(f"--dims takes comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise typer.BadParameter(f"--dims takes positive integers, got {text!r}")
    return dims


@explain_app.command("attention-scaling")
def attention_scaling(
    trials: Annotated[int, typer.Option(min=2, help="simulated queries per d_k")] = 2000,
    keys: Annotated[int, typer.Option(min=2, help="simulated keys per query")] = 64,
    dims: Annotated[str, typer.Option(help="simulated head dimensions d_k, comma-separated")] = "4,64,256",
    model: Annotated[str, typer.Option(help="the real model whose attention logits are measured: a named local "
                                            "model, .gguf or checkpoint directory; 'none' to skip")]
    = "smollm2-135m-instruct",
    seed: Annotated[int, typer.Option(help="seed of the simulation")] = 0,
    device: Annotated[str, typer.Option(help="device of the real model: cpu, cuda, auto")] = "cpu",
    out: Annotated[Path, typer.Option(help="directory for attention_scaling.csv and the PNGs")]
    = Path("runs/explain/attention-scaling"),
) -> None:
    """Why attention divides q·k by √d_k: softmax saturation of q, k ~ N(0, 1) per d_k with and without the
    scaling (logit variance, largest weight, entropy), then the same statistics on a real model's logits."""
    from rich.console import Console

    from .explain_attention_scaling import ScalingConfig, layer_table, run_attention_scaling, summary_table

    cfg = ScalingConfig(dims=_dims(dims), keys=keys, trials=trials, seed=seed, device=device,
                        model=None if model.lower() == "none" else model)
    console = Console(width=140) if not sys.stdout.isatty() else Console()  # piped: no 80-column cut
    result = run_attention_scaling(cfg, out, print_fn=lambda s: typer.secho(s, fg=typer.colors.YELLOW, err=True))
    console.print(summary_table(result, keys))
    if result.model is not None:
        console.print(layer_table(result))
        console.print(f"{result.model.tokens} prompt tokens; rows: queries attending to >= {cfg.min_keys} keys, "
                      "every head")
    elif cfg.model is not None:
        console.print(f"[yellow]real model not measured: {result.model_note}[/yellow]")
    typer.echo("wrote " + ", ".join(str(p) for p in result.files))
