"""``lucidlm facts build / answer / label``: the facts benchmark from a terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..jsonl import read_jsonl, write_jsonl

facts_app = typer.Typer(help="Facts benchmark: questions about real cities, countries and elements, answered by a "
                             "model and graded claim by claim into probe JSONL.", no_args_is_help=True)


def _report(rows: list[dict]) -> None:
    from ..facts.report import accuracy_by_type, markdown

    typer.echo(markdown(accuracy_by_type(rows)))


@facts_app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="questions JSONL to write")],
    per_type: Annotated[int, typer.Option(min=1, help="questions per type (all entities when a type has fewer)")] = 500,
    types: Annotated[list[str] | None, typer.Option("--type", help="question type (repeatable; default: the "
                                                                  "types the 135M model is half right on)")] = None,
    seed: Annotated[int, typer.Option(help="the same seed draws the same entities")] = 0,
) -> None:
    """Draw questions from the data packages: one per entity and type, with the accepted answers."""
    from ..facts.questions import DEFAULT_TYPES, build_questions

    questions = build_questions(seed, per_type, tuple(types) if types else DEFAULT_TYPES)
    write_jsonl(out, questions)
    counts: dict[str, int] = {}
    for q in questions:
        counts[q["type"]] = counts.get(q["type"], 0) + 1
    typer.echo(f"{len(questions)} questions in {out}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))


@facts_app.command("answer")
def answer(
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint directory or model name")],
    questions: Annotated[Path, typer.Option(help="questions JSONL (from `lucidlm facts build`)")],
    out: Annotated[Path, typer.Option(help="annotated answers JSONL to write")],
    samples: Annotated[int, typer.Option(min=1, help="answers per question: greedy, then sampled")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="temperature of the sampled answers")] = 0.7,
    seed: Annotated[int, typer.Option(help="makes the sampled answers reproducible")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts decoded together")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
) -> None:
    """Answer every question with the model's chat template; grade each claim; print accuracy per type."""
    import time

    from ..api import load
    from ..facts.answers import answer_questions

    lm = load(model, dtype=dtype, device=device, compile="off")  # batches of many step shapes (see apps/demo.py)
    qs = read_jsonl(questions)
    start = time.perf_counter()
    rows = answer_questions(lm, qs, samples=samples, temperature=temperature, seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - start
    write_jsonl(out, rows)
    typer.echo(f"{len(rows)} answers in {seconds:.0f} s ({len(rows) / seconds:.2f} answers/s) -> {out}", err=True)
    _report(rows)


@facts_app.command("label")
def label(
    answers: Annotated[Path, typer.Option(help="answers JSONL (from `lucidlm facts answer`)")],
    out: Annotated[Path | None, typer.Option(help="write the re-graded rows here (default: only report)")] = None,
) -> None:
    """Grade an answers file again from each row's own truth; print accuracy per type."""
    from ..facts.answers import regrade

    rows = [regrade(r) for r in read_jsonl(answers)]
    if out is not None:
        write_jsonl(out, rows)
    _report(rows)
