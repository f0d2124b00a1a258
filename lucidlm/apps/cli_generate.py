"""``lucidlm generate`` and ``lucidlm chat``: the engine from a terminal.

Option names follow the Python API (``--max-new-tokens`` is ``max_new_tokens``, ...). Text streams
to stdout as it is decoded; ``--json`` prints one JSON object per prompt instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

Model = Annotated[Path, typer.Option("--model", "-m", help="checkpoint directory (config.json, safetensors, ...)")]
MaxNewTokens = Annotated[int, typer.Option(help="tokens to generate at most")]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy; default: greedy unless a sampling option is set")]
TopK = Annotated[int | None, typer.Option(help="sample among the k most likely tokens (0 = off)")]
TopP = Annotated[float | None, typer.Option(help="nucleus sampling: smallest set with probability >= p, in (0, 1]")]
MinP = Annotated[float | None, typer.Option(help="drop tokens below min_p x the top probability")]
RepetitionPenalty = Annotated[float | None, typer.Option(help="> 1 discourages tokens already present (CTRL)")]
Seed = Annotated[int | None, typer.Option(help="makes sampling reproducible")]
Stop = Annotated[list[str] | None, typer.Option(help="stop string (repeatable); the text ends before it")]
NumBeams = Annotated[int, typer.Option(help="beam search with this many beams (1 = off)")]
LengthPenalty = Annotated[float, typer.Option(help="beam score = logprob sum / length ** length_penalty")]
BestOf = Annotated[int, typer.Option(help="sample N completions, print the one with the best mean logprob")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (the checkpoint's)")]
Compile = Annotated[str | None, typer.Option(
    "--compile", help="decode steps as one compiled graph: on (default on CPU: loaded from ~/.cache/lucidlm, or "
                      "compiled once per machine and kept there) or off")]
Probe = Annotated[Path | None, typer.Option(help="probe directory: score every token (JSON: scores; text: risky "
                                             "tokens in red)")]
PackWeights = Annotated[bool, typer.Option("--pack-weights", help="CPU: oneDNN-packed weights, ~2x faster matmuls, "
                                           "twice the weight memory")]
Quantize = Annotated[str | None, typer.Option(help="CPU: none, gguf (keep a GGUF file's Q8_0/Q4_0/Q4_1 weights), "
                                              "int8 or int4 (weight-only quantized linear layers); default: gguf "
                                              "for a GGUF file on CPU (without LoRA), else none")]


def _options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, num_beams,
             length_penalty) -> dict[str, Any]:
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()))
    if num_beams != 1:  # (0 reaches the config's check)
        options.update(num_beams=num_beams, length_penalty=length_penalty)
    return options


def _load(model: Path, device: str, dtype: str, compile: str | None = None, pack_weights: bool = False,
          probe: Path | None = None, quantize: str | None = None):
    from ..api import load

    lm = load(model, dtype=dtype, device=device, compile=compile, pack_weights=pack_weights, probe=probe,
              quantize=quantize)
    if lm.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer.json, so text prompts cannot be encoded")
    return lm


def generate_command(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts")],
    model: Model,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    stop: Stop = None,
    num_beams: NumBeams = 1,
    length_penalty: LengthPenalty = 1.0,
    best_of: BestOf = 1,
    chat: Annotated[bool, typer.Option(help="wrap each prompt as a user message in the chat template")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per prompt (text, token_ids, logprobs)")]
    = False,
    device: Device = "auto",
    dtype: Dtype = "float32",
    compile: Compile = None,
    pack_weights: PackWeights = False,
    quantize: Quantize = None,
    probe: Probe = None,
    threshold: Annotated[float, typer.Option(help="with --probe: tokens scoring above this are shown in red")] = 0.5,
) -> None:
    """Continue each PROMPT, streaming the text (or print JSON with --json)."""
    from ..generate.generation_config import GenerationConfig

    options = _options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, num_beams,
                       length_penalty)
    GenerationConfig.from_kwargs(**options)  # bad options fail before the model loads
    lm = _load(model, device, dtype, compile, pack_weights, probe, quantize)
    inputs = [_chat_ids(lm, p) if chat else p for p in prompts]
    if as_json or num_beams > 1 or best_of > 1:  # whole results: one batch
        results = lm.generate(inputs, best_of=best_of, **options)
        for prompt, c in zip(prompts, results):
            record = dict(prompt=prompt, text=c.text, token_ids=c.token_ids, logprobs=c.logprobs,
                          finish_reason=c.finish_reason)
            if c.score is not None:
                record["score"] = c.score
            if c.scores is not None:
                record["scores"] = c.scores
            typer.echo(json.dumps(record, ensure_ascii=False) if as_json else c.text)
        return
    for i, prompt in enumerate(inputs):
        if len(prompts) > 1:
            typer.secho(f"--- prompt {i}: {prompts[i]!r}", fg=typer.colors.BRIGHT_BLACK, err=True)
        for token in lm.stream(prompt, **options):
            risky = token.score is not None and token.score > threshold
            sys.stdout.write(typer.style(token.text, fg=typer.colors.RED, bold=True) if risky else token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _chat_ids(lm, text: str) -> list[int]:
    from ..generate.text_generation import chat_prompt

    return chat_prompt(lm.generator(), [{"role": "user", "content": text}])


def chat_command(
    model: Model,
    system: Annotated[str | None, typer.Option(help="a system message opening the conversation")] = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    stop: Stop = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    compile: Compile = None,
    pack_weights: PackWeights = False,
    quantize: Quantize = None,
) -> None:
    """Talk with a model: each line you type is a user turn, the history is kept.

    Commands: /reset forgets the history, /exit (or Ctrl-D) quits.
    """
    from ..generate.generation_config import GenerationConfig

    options = _options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, 1, 1.0)
    GenerationConfig.from_kwargs(**options)
    lm = _load(model, device, dtype, compile, pack_weights, quantize=quantize)
    if lm.tokenizer.chat_template is None:
        raise ValueError(f"{model}: tokenizer_config.json has no chat_template; use `lucidlm generate` instead")
    try:
        import readline  # noqa: F401  (line editing and ↑ history where the platform has it)
    except ImportError:
        pass
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(opening)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        if interactive:
            sys.stdout.write("model> ")
        for token in lm.chat(history, stream=True, **options):
            reply.append(token.text)
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
