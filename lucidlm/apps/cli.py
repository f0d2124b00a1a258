"""``lucidlm <verb>``: one command, verbs that read like the task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="lucidlm: a hackable, pure-PyTorch LLM stack that knows when it is making things up.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _describe(cfg, n_params: int, model_type: str) -> dict:
    import torch

    from ..model.kv_cache import kv_cache_bytes, kv_cache_bytes_per_token

    attention = "MLA" if cfg.mla else ("MHA" if cfg.n_kv_heads == cfg.n_heads else
                                       "MQA" if cfg.n_kv_heads == 1 else "GQA")
    return {
        "model_type": model_type, "parameters": n_params, "layers": cfg.n_layers, "dim": cfg.dim,
        "heads": cfg.n_heads, "kv_heads": None if cfg.mla else cfg.n_kv_heads,
        "head_dim": (f"qk {cfg.mla.qk_nope_head_dim}+{cfg.mla.qk_rope_head_dim} rope, v {cfg.mla.v_head_dim}, "
                     f"kv latent {cfg.mla.kv_lora_rank}") if cfg.mla else cfg.head_dim,
        "attention": attention,
        "ffn": ("MoE" if cfg.moe else ("gated " if cfg.gated_mlp else "") + cfg.activation),
        "experts": f"{cfg.moe.top_k} of {cfg.moe.n_experts} (+{cfg.moe.n_shared_experts} shared)" if cfg.moe else None,
        "positions": cfg.positions + (f" ({cfg.rope_scaling.type} scaling)" if cfg.rope_scaling.type != "default"
                                      and cfg.positions == "rope" else ""),
        "norm": f"{cfg.norm}, {cfg.norm_placement}", "vocab": cfg.vocab_size, "context": cfg.max_seq_len,
        "sliding_window": cfg.sliding_window, "tied_embeddings": cfg.tie_embeddings, "dtype": cfg.dtype,
        # what serving costs beyond the weights (bf16 cells; sliding-window layers stop growing at the window)
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, torch.bfloat16),
        "kv_cache_bytes_full_context": kv_cache_bytes(cfg, cfg.max_seq_len, dtype=torch.bfloat16),
    }


@app.command()
def info(
    path: Annotated[Path | None, typer.Argument(help="checkpoint directory (config.json + safetensors), .gguf "
                                                     "file or named local model")] = None,
    preset: Annotated[str | None, typer.Option(help="describe a named preset instead of a checkpoint")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Describe a checkpoint's architecture (reads only config.json, or a GGUF file's metadata) or a preset."""
    import torch

    from ..checkpoint import read_hf_config
    from ..config import PRESETS, from_preset
    from ..model.transformer import Transformer

    if (path is None) == (preset is None):
        raise typer.BadParameter("give exactly one of PATH or --preset (presets: " + ", ".join(PRESETS) + ")")
    if preset is not None:
        cfg, model_type = from_preset(preset), f"preset {preset}"
    else:
        hf, _, cfg = read_hf_config(path)
        model_type = hf["model_type"]
    with torch.device("meta"):  # count parameters without allocating them
        n = Transformer(cfg).num_parameters()
    desc = _describe(cfg, n, model_type)
    if as_json:
        typer.echo(json.dumps(desc))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(path or preset))
    for k, v in desc.items():
        table.add_row(k, f"{v / 1e6:.1f} M" if k == "parameters" else str(v))
    Console().print(table)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help=".gguf file (or a directory holding one) or named local model")],
    out: Annotated[Path, typer.Argument(help="directory to write the Hugging Face checkpoint to")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (the file's float type; "
                                            "quantized weights dequantize to float32)")] = "auto",
) -> None:
    """Convert a GGUF model to a Hugging Face checkpoint directory: config.json, model.safetensors,
    tokenizer.json and tokenizer_config.json (with the chat template)."""
    from ..api import load

    lm = load(source, dtype=dtype, device="cpu", quantize="none")  # float weights are what it writes
    typer.echo(f"wrote {lm.save(out)} ({lm.model.num_parameters() / 1e6:.1f}M params, {lm.dtype})")


@app.command()
def merge(
    model: Annotated[Path, typer.Argument(help="the base checkpoint the adapter was trained on")],
    adapter: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter directory (adapter_config.json + "
                                                 "adapter_model.safetensors)")],
    out: Annotated[Path, typer.Argument(help="directory to write the merged checkpoint to")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (the checkpoint's)")] = "auto",
) -> None:
    """Fold a LoRA adapter into its base model's weights (PEFT's merge_and_unload) and save the result as an
    ordinary checkpoint in the base's layout, with its tokenizer: one to serve without the adapter, or to
    fine-tune further (a second adapter on top of the first)."""
    from ..api import load
    from ..checkpoint import CheckpointError
    from ..checkpoint.files import has_file
    from ..checkpoint.peft_adapter import CONFIG_FILE
    from ..model.lora import merge_and_unload

    if not has_file(adapter, CONFIG_FILE):  # a bottleneck adapter adds modules: there is nothing to fold it into
        raise CheckpointError(f"{adapter}: no {CONFIG_FILE}; merge folds a PEFT LoRA adapter into the weights")
    if out.resolve() in (Path(model).resolve(), adapter.resolve()):
        raise ValueError(f"--out {out} is the model's or the adapter's own directory; write the merge elsewhere")
    lm = load(model, adapter=adapter, dtype=dtype, device="cpu", quantize="none")
    merge_and_unload(lm.model)
    typer.echo(f"wrote {lm.save(out)} ({lm.model.num_parameters() / 1e6:.1f}M params, {lm.dtype})")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="cache directory: every stage is kept here and reused "
                                                  "(default runs/demo, or runs/demo-world with --world)")] = None,
    world: Annotated[bool, typer.Option("--world", help="the synthetic-world sandbox instead of the real model: "
                                                        "fictional people, a small model trained here")] = False,
    model: Annotated[str, typer.Option(help="the model to probe: a named local model, a .gguf or a checkpoint "
                                            "directory")] = "smollm2-135m-instruct",
    seed: Annotated[int, typer.Option(help="seed of the questions and splits (--world: of the world)")] = 0,
    samples: Annotated[int, typer.Option(min=1, help="answers per question: greedy + sampled")] = 2,
    scale: Annotated[float, typer.Option(min=0.01, help="questions per type x this (1: about 10 min cold on 2 "
                                                        "cores; more: tighter confidence intervals)")] = 1.0,
    people: Annotated[int | None, typer.Option(min=10, help="--world: people in the world (default 200)")] = None,
    lm_steps: Annotated[int | None, typer.Option(min=1, help="--world: pretraining steps of the small model "
                                                             "(default 1500)")] = None,
    unseen: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="--world: share of the people never in "
                                                                      "the corpus (default 0.5)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (for answering and scoring)")] = "float32",
    live: Annotated[bool, typer.Option(help="end with live answers coloured by their scores")] = True,
    lora_steps: Annotated[int, typer.Option(min=0, help="also train a LoRA probe (KL-regularised) for this many "
                                                        "steps and report it and its KL cost (0: off; slow on CPU)")
                          ] = 0,
) -> None:
    """The main job: a real pretrained model (SmolLM2-135M-Instruct, installed by setup) answers questions about
    countries, cities and chemical elements; every claim is graded against ground truth; a probe on its hidden
    states is chosen on validation entities and measured on held-out ones against token NLL, entropy, the
    claimed value's prior, sample disagreement and a random head (pooled and per question type, with CIs);
    then what acting on its scores buys, and live answers coloured by risk. Each stage is cached under --out;
    a second run starts in seconds. --world: the synthetic-world sandbox (a small model trained here)."""
    given = {k: v for k, v in (("people", people), ("lm_steps", lm_steps), ("unseen", unseen)) if v is not None}
    if given and not world:
        raise typer.BadParameter(f"{', '.join('--' + k.replace('_', '-') for k in given)}: only with --world")
    if world:
        from .demo_world import DemoConfig as WorldDemoConfig
        from .demo_world import run_demo as run_world_demo

        run_world_demo(out or Path("runs/demo-world"), WorldDemoConfig(seed=seed, device=device, dtype=dtype, **given))
        return
    from .demo import DemoConfig, run_demo

    run_demo(out or Path("runs/demo"), DemoConfig(model=model, seed=seed, scale=scale, samples=samples,
                                                  device=device, dtype=dtype, lora_steps=lora_steps), live=live)


@app.command()
def bench(
    prompt: Annotated[int, typer.Option(help="prompt tokens")] = 64,
    new: Annotated[int, typer.Option(help="tokens to decode")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="runs per measurement (the median is reported)")] = 3,
    batch: Annotated[list[int] | None, typer.Option(help="decode batch sizes (repeatable)")] = None,
    dtype: Annotated[list[str] | None, typer.Option(help="float32 and/or bfloat16 (repeatable)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice)")] = None,
    train: Annotated[bool, typer.Option("--train", help="measure training instead: tokens/s and peak memory")]
    = False,
    probe: Annotated[bool, typer.Option("--probe", help="measure what a hallucination probe adds to a streaming "
                                                        "decode step")] = False,
    quant: Annotated[bool, typer.Option("--quant", help="quantized weights per format: decode/prefill tok/s, "
                                                        "perplexity, greedy agreement with bf16 (--model: default "
                                                        "smollm2-135m-instruct)")] = False,
    llamacpp: Annotated[bool, typer.Option("--llamacpp", help="with --quant: llama.cpp on the same GGUF file, "
                                                              "beside lucidlm (pip install 'lucidlm[llamacpp]')")]
    = False,
    demo: Annotated[Path | None, typer.Option(help="a finished `lucidlm demo` directory: with --quant, its probe is "
                                                   "measured per format (default: runs/demo when it holds one and "
                                                   "--model is the demo's); with --guided (default runs/demo)")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="measure the HTTP server: aggregate tok/s, time to first "
                                                        "token and inter-token latency per number of clients")]
    = False,
    clients: Annotated[list[int] | None, typer.Option(help="with --serve: concurrent clients (repeatable; "
                                                           "default 1, 8, 32)")] = None,
    model: Annotated[Path | None, typer.Option(help="with --serve: checkpoint to serve (default: a random "
                                                    "Llama-shaped 125M); with --quant: the model to quantize "
                                                    "(random-125m: that random model, speed only)")] = None,
    scenario: Annotated[list[str] | None, typer.Option(help="with --serve: levels (1/8/32 clients), long-prompt "
                                                            "(a long prompt arrives while clients stream), "
                                                            "shared-prefix (2nd request reuses a prompt head); "
                                                            "repeatable, default all")] = None,
    long_prompt: Annotated[int, typer.Option(min=1, help="with --serve: tokens of the long-prompt scenario's "
                                                         "prompt")] = 2000,
    long_clients: Annotated[int, typer.Option(min=1, help="with --serve: clients streaming while it arrives")] = 32,
    shared_prefix: Annotated[int, typer.Option(min=1, help="with --serve: tokens of the shared-prefix scenario's "
                                                           "common head")] = 500,
    long: Annotated[bool, typer.Option("--long", help="length extrapolation: small RoPE and ALiBi models trained "
                                                      "at 256 tokens, perplexity at 256-2048 per RoPE scaling kind "
                                                      "and DCA (table + PNG under runs/bench-long)")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="with --long: a tiny model and lengths, seconds long "
                                                        "(a smoke test; its numbers mean nothing)")] = False,
    attention: Annotated[bool, typer.Option("--attention", help="time and peak memory of attention kinds vs "
                                                                "sequence length: SDPA, linear (chunked, "
                                                                "recurrent), local + global and block-sparse "
                                                                "masks")] = False,
    adapters: Annotated[bool, typer.Option("--adapters", help="LoRA vs bottleneck adapters vs full fine-tuning: "
                                                              "trainable params, loss, time (--model: the base; "
                                                              "default a small random Llama)")] = False,
    steps: Annotated[int, typer.Option(min=1, help="with --adapters: training steps per method")] = 50,
    deepnorm: Annotated[bool, typer.Option("--deepnorm", help="a 24-layer post-LN vs DeepNorm vs pre-LN stack at "
                                                              "one learning rate: loss after 25 steps")] = False,
    guided: Annotated[bool, typer.Option("--guided", help="probe-guided decoding on a finished demo's held-out "
                                                          "questions (--demo, default runs/demo): accuracy vs "
                                                          "attempt rate of plain, abstain and resample-best-of-k "
                                                          "(table + PNG under runs/bench-guided)")] = False,
    questions: Annotated[int, typer.Option(min=1, help="with --guided: held-out questions answered")] = 60,
    attempts: Annotated[int, typer.Option(min=1, help="with --guided: attempts per resampled sentence (k)")] = 3,
) -> None:
    """lucidlm vs transformers on the same random Llama-shaped 125M model: prefill and decode tok/s,
    the memory-bandwidth bound, and an overhead-bound tiny model. Prints a Markdown table.
    With --train: training tokens/s and peak memory on a Llama-shaped 30M model.
    With --long: perplexity beyond the trained context (RoPE scalings, NTK-by-parts, DCA, ALiBi).
    With --probe: the decode-step cost of scoring every token with a probe while streaming.
    With --guided: probe-guided decoding (abstain or resample a flagged sentence) vs plain, on the demo's test set.
    With --deepnorm: a 24-layer post-LN vs DeepNorm vs pre-LN stack at one learning rate (loss after 25 steps).
    With --attention: forward time and peak memory of SDPA, linear attention and sparse masks, N = 256..8192.
    With --serve: the OpenAI server under 1, 8 and 32 concurrent streaming clients (continuous batching), a long
    prompt arriving while 32 clients stream (chunked prefill) and a 2nd request sharing a prompt head (prefix
    caching), with the serving targets beside the measured values."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    if long:
        from .bench_long import LongBenchConfig, long_table, run_long_bench

        result = run_long_bench(LongBenchConfig.quick() if quick else LongBenchConfig(),
                                print_fn=lambda s: typer.echo(s, err=True))
        typer.echo(long_table(result) + f"\n\nplot: {result['out']}/long_context.png")
        return
    if deepnorm:
        from .bench_deepnorm import deepnorm_table, run_deepnorm_bench

        typer.echo(deepnorm_table(run_deepnorm_bench()))
        return
    if adapters:
        from .bench_adapters import AdapterBench, adapter_table, run_adapter_bench

        result = run_adapter_bench(AdapterBench(steps=steps), model, print_fn=lambda s: typer.echo(s, err=True))
        typer.echo(adapter_table(result))
        return
    if quant:
        from .bench_quant import quant_table, run_quant_bench

        name = str(model or "smollm2-135m-instruct")
        if demo is None and model is None and (Path("runs/demo") / "probe" / "probe").is_dir():
            demo = Path("runs/demo")
        rows, bandwidth = run_quant_bench(name, prompt, min(new, 64), repeats,
                                          print_fn=lambda s: typer.echo(s, err=True), llamacpp=llamacpp, demo=demo)
        typer.echo(quant_table(rows, bandwidth, name))
        return
    if serve:
        from .bench_serve import SCENARIOS, run_serve_bench, serve_table

        result = run_serve_bench(model, tuple(clients or (1, 8, 32)), max(repeats - 1, 1), prompt, min(new, 64),
                                 print_fn=lambda s: typer.echo(s, err=True), scenarios=tuple(scenario or SCENARIOS),
                                 long_prompt=long_prompt, long_clients=long_clients, shared_prefix=shared_prefix)
        typer.echo(serve_table(result))
        return
    if attention:
        from .bench_attention import attention_table, run_attention_bench

        typer.echo(attention_table(run_attention_bench(repeats=repeats, print_fn=lambda s: typer.echo(s, err=True))))
        return
    if guided:
        from .bench_guided import GuidedBench, bench_guided

        _, table = bench_guided(GuidedBench(demo=demo or Path("runs/demo"), questions=questions, k=attempts),
                                print_fn=lambda s: typer.echo(s, err=True))
        typer.echo(table)
        return
    if probe:
        from .bench_probe import probe_table, run_probe_bench

        typer.echo(probe_table(run_probe_bench(prompt, min(new, 64), max(repeats, 5))))
        return
    if train:
        from .bench_train import run_train_bench, train_table

        theirs, ours = run_train_bench(steps=repeats + 2)
        typer.echo(train_table(theirs, ours, 4, 256))
        return
    from .bench import markdown_table, run_bench

    rows, bandwidth = run_bench(prompt, new, repeats, tuple(batch or (1, 8)), tuple(dtype or ("float32", "bfloat16")),
                                threads, print_fn=lambda s: typer.echo(s, err=True))
    typer.echo(markdown_table(rows, bandwidth))


from .cli_generate import chat_command, generate_command  # noqa: E402  (the commands need `app`'s module first)

app.command("generate")(generate_command)
app.command("chat")(chat_command)

from .cli_serve import serve_command  # noqa: E402

app.command("serve")(serve_command)

from .cli_train import register as _register_training  # noqa: E402

_register_training(app)

from .cli_facts import facts_app  # noqa: E402

app.add_typer(facts_app, name="facts")

from .cli_explain import explain_app  # noqa: E402

app.add_typer(explain_app, name="explain")


def main() -> None:
    from ..checkpoint import CheckpointError

    try:
        app()
    except (CheckpointError, ValueError, OSError) as e:  # bad input or a missing/unwritable file: one clear line
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
