"""Hallucination before and after RL, measured on held-out entities: ``lucidlm rl-eval``.

Each prompt is answered greedily and by ``samples`` sampled responses (the engine, as the RL rollouts), every answer
graded against the ground truth (``rl_rewards``' gradings: the world's labeler, the facts grader), then
``rl_metrics.hallucination_metrics``: supported-claim rate, claims per answer, no-claim rate, abstention on entities
the model cannot know and on entities it knew. "Known" must come from the model BEFORE training (``known_from``: the
rows an earlier ``rl-eval`` of the base model wrote); without it the rows at hand define it (the before run).
With ``probe`` (a probe trained for the base model), each claim span is also scored by the probe on the model's own
tokens and the probe's span-max AUROC reported beside the NLL baseline's (``rl_probe_eval.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..generate.generation_config import GenerationConfig
from ..jsonl import read_json
from ..train.rewards import RLPrompt, Rollout
from ..train.rl_rollouts import encode_prompt, prompt_options
from .question_probe_recipe import question_risks
from .rl_metrics import hallucination_metrics, knowledge_sets, world_unknowable
from .rl_probe_eval import attach_eval_probe, probe_metrics, probe_spans
from .rl_rewards import FactsGrading, Grading, WorldGrading, graded_row

METRICS = ("supported_rate", "claims_per_answer", "no_claim_rate", "abstention_unknowable", "abstention_known",
           "probe_auroc", "nll_auroc", "probe_spans", "probe_positives", "probe_unscored")


def grading_for(spec: str) -> tuple[Grading, set[str] | None]:
    """``world:DIR`` or ``facts`` -> (the grading, the world's unknowable people or None: facts reads ``knowable``
    from each prompt's meta)."""
    name, _, arg = spec.partition(":")
    if name == "world":
        if not arg:
            raise ValueError("the grader world:DIR needs the world's directory")
        from ..world.build import read_people

        return WorldGrading(read_people(arg)), world_unknowable(arg)
    if name == "facts":
        return FactsGrading(), None
    raise ValueError(f"unknown grader {spec!r}: world:DIR or facts")


def sampled_rollouts(lm: Any, prompts: list[RLPrompt], samples: int, max_new_tokens: int, seed: int = 0,
                     greedy: bool = True) -> list[tuple[Rollout, str]]:
    """(rollout, kind) from the engine: with ``greedy``, one greedy answer per prompt ("greedy"), then ``samples``
    sampled ones per prompt ("sample": temperature 1, seed + prompt index), each prompt within its own limits as
    the RL rollouts (rl_rollouts.prompt_options: a facts question's max_new_tokens and stop strings). The one
    generation path of ``rl-eval`` and ``rl-pairs``."""
    gen = lm.generator()
    ids = [encode_prompt(p, lm.tokenizer) for p in prompts]
    options = [prompt_options(p, max_new_tokens) for p in prompts]
    out = []

    def add(completions: list, n: int, kind: str) -> None:
        for row, completion in enumerate(completions):
            i = row // n
            out.append((Rollout(prompts[i], tuple(ids[i]), tuple(completion.token_ids), completion.text,
                                completion.finish_reason), kind))

    if greedy:
        add(gen.generate(ids, [GenerationConfig.from_kwargs(**o) for o in options], progress="greedy answers"), 1,
            "greedy")
    if samples:
        configs = [GenerationConfig.from_kwargs(**o, temperature=1.0, seed=seed + i) for i, o in enumerate(options)]
        add(gen.generate(ids, configs, n=samples, progress="sampled answers"), samples, "sample")
    return out


def evaluate(lm: Any, prompts: list[RLPrompt], grader: str, samples: int = 3, max_new_tokens: int = 48,
             known_from: str | Path | None = None, seed: int = 0,
             probe: str | Path | None = None, question_probe: str | Path | None = None) -> tuple[list[dict], dict]:
    """(graded rows, metrics). Unknowable: the world's never-mentioned people, or the prompts whose meta says
    knowable = false (facts); known: from ``known_from``'s rows (the base model's), else these. ``probe``: a probe
    directory, attached (and refused if made for another model) before any answer; each row then holds
    "probe_spans" and the metrics the probe's and the NLL's span-max AUROC (rl_probe_eval.py). ``question_probe``:
    each row also holds its question's "question_risk" (question_probe_recipe.question_risks), scored first."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if samples < 0 or max_new_tokens < 1:
        raise ValueError(f"samples must be >= 0 and max_new_tokens >= 1, got {samples} and {max_new_tokens}")
    grading, unknowable = grading_for(grader)
    before = read_json(known_from) if known_from is not None else None  # read first: a bad file fails before work
    attached = attach_eval_probe(lm, probe) if probe is not None else None
    risks = question_risks(lm, question_probe, prompts) if question_probe is not None else None
    answers = sampled_rollouts(lm, prompts, samples, max_new_tokens, seed)
    rows = [graded_row(grading, rollout) | {"kind": kind} for rollout, kind in answers]
    if risks is not None:
        rows = [row | {"question_risk": risks[str(row["id"])]} for row in rows]
    if attached is not None:
        scored = probe_spans(lm, attached, [r for r, _ in answers], rows, grading)
        rows = [row | {"probe_spans": spans} for row, spans in zip(rows, scored)]
    return rows, rows_metrics(rows, unknowable, before)


def unknowable_of(rows: list[dict], unknowable: set[str] | None) -> set[str]:
    """The world's strangers as given, else (facts) the keys of the rows whose prompt says knowable = false."""
    return unknowable if unknowable is not None else {str(r["id"]) for r in rows if not r["knowable"]}


def known_of(reference: list[dict]) -> set[str]:
    """The entities the base model's rows answered right in most samples (rl_metrics.knowledge_sets)."""
    return knowledge_sets([r for r in reference if r["knowable"]])["known"]


def rows_metrics(rows: list[dict], unknowable: set[str] | None, before: list[dict] | None = None) -> dict:
    """The metrics of graded rows (``evaluate``'s, or as saved): unknowable None = the rows' knowable flags; known
    from ``before``'s rows (the base model's), else these; the probe's rows when the rows hold probe spans."""
    unknowable = unknowable_of(rows, unknowable)
    known = known_of(before if before is not None else rows)
    metrics = hallucination_metrics(rows, unknowable, known)
    return metrics | (probe_metrics(rows) if rows and all("probe_spans" in r for r in rows) else {})


def compare(files: list[str | Path], grader: str, known_from: str | Path | None = None) -> str:
    """The markdown table of saved ``rl-eval --out`` rows, one column per file (named by its stem), "known" from
    ``known_from`` (default: the first file's rows, the base model's)."""
    if not files:
        raise ValueError("no rows files to compare")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"rows files not found: {missing}")
    _, unknowable = grading_for(grader)
    runs = {Path(f).stem: read_json(f) for f in files}
    before = read_json(known_from) if known_from is not None else next(iter(runs.values()))
    return metrics_table({name: rows_metrics(rows, unknowable, before) for name, rows in runs.items()})


def metric_cell(m: dict | None) -> str:
    """value [95% CI], a count alone, or "—" (not measured in this run, nothing to measure, or undefined)."""
    if m is not None and "lo" not in m:  # a count
        return str(int(m["value"]))
    if m is None or m["n"] == 0 or m["value"] != m["value"]:  # NaN: e.g. an AUROC over one class
        return "—"
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def metrics_table(named: dict[str, dict]) -> str:
    """Markdown: one row per metric, one column per named run (value [95% CI]; "—" where a run lacks it). The
    probe's rows only when some run has them: a table without a probe reads as before."""
    names = list(named)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in METRICS:
        if not any(metric in named[name] for name in names):
            continue  # a row no run measured (no run had a probe)
        cells = [metric_cell(named[name].get(metric)) for name in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
