"""``lucidlm demo``: the main job. A real pretrained model answers questions about real facts, every claim is
graded exactly, and a probe learns — from the model's own hidden states — when it is making things up.

Stages, each cached under ``out`` and rebuilt only when its settings (or an earlier stage) change:

    model      SmolLM2-135M-Instruct from its installed GGUF, written once as a safetensors checkpoint
    questions  several question types about countries, cities and elements (facts/questions.py)
    answers    greedy + sampled answers in the model's own words, each claim graded (facts/answers.py)
    probe      entities split train / validation / test; alignment, layer and L2 chosen on validation;
               on test: probe vs NLL, entropy, claimed-value prior, sample disagreement, random head,
               pooled and per question type with bootstrap CIs; selective answering; best-of-N
               (probe/benchmark.py)

Then it streams answers to held-out questions with every token coloured by its live probe score.
``lucidlm demo --world`` runs the synthetic-world sandbox instead (demo_world.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..jsonl import read_json, read_jsonl, write_json, write_jsonl
from ..tokenizer import pad_id
from .demo_cache import Cache, risk_color, stage_keys, timed_stage

# questions per type at scale 1: sized for about 10 minutes cold on 2 CPU cores; --scale 4 for tighter intervals
# (element types hold at most the 118 elements). Types where SmolLM2-135M is right 15-85% of the time.
PER_TYPE = {"city_country": 150, "country_capital": 80, "element_symbol": 60, "element_profile": 30,
            "country_profile": 20}
NAMES = {"probe": "probe (linear head)", "probe_lora": "LoRA probe", "probe_other_alignment": "probe, other alignment",
         "nll": "span max token NLL", "entropy": "span max entropy", "value_prior": "claimed-value prior",
         "sample_disagreement": "sample disagreement", "random_head": "random-init head"}
SHORT = {"probe": "probe", "probe_lora": "LoRA", "probe_other_alignment": "probe (other)", "nll": "NLL",
         "entropy": "entropy", "value_prior": "value prior", "sample_disagreement": "disagree", "random_head": "random"}
BENCHMARK_VERSION = 2  # bump when the probe stage's computation changes


@dataclass
class DemoConfig:
    model: str = "smollm2-135m-instruct"
    seed: int = 0
    scale: float = 1.0  # multiplies PER_TYPE
    samples: int = 2  # answers per question: greedy + sampled
    temperature: float = 0.7
    layers: tuple[int, ...] = (5, 9, 13, 16, 19, 22, 25, 28)  # blocks swept (SmolLM2: 30; seed 0 picks 13)
    split: tuple[float, float, float] = (0.5, 0.15, 0.35)  # entities: train / validation / test
    device: str = "auto"
    dtype: str = "float32"
    n_boot: int = 1000
    lora_steps: int = 0  # > 0: also a LoRA probe (KL-regularised) trained this many steps, reported beside the rest

    def per_type(self) -> dict[str, int]:
        return {t: max(1, round(n * self.scale)) for t, n in PER_TYPE.items()}


def _stage_keys(config: DemoConfig) -> dict[str, str]:
    return stage_keys({
        "model": [config.model],
        "questions": [config.seed, sorted(config.per_type().items())],
        "answers": [config.samples, config.temperature, config.dtype],
        "probe": [list(config.layers), list(config.split), config.n_boot, config.lora_steps, BENCHMARK_VERSION],
    })


def demo_cache(out: Path, config: DemoConfig) -> Cache:
    return Cache(out, _stage_keys(config))


# --- the stages -------------------------------------------------------------------------------------
def model_stage(cache: Cache, config: DemoConfig) -> Path:
    import lucidlm

    if not cache.fresh("model"):
        lucidlm.load(config.model, device="cpu", quantize="none").save(cache.start("model"))
        cache.finish("model")
    return cache.out / "model"


def questions_stage(cache: Cache, config: DemoConfig) -> list[dict]:
    from ..facts.questions import build_questions

    if not cache.fresh("questions"):
        out = cache.start("questions")
        per_type = config.per_type()
        write_jsonl(out / "questions.jsonl", build_questions(config.seed, per_type, list(per_type)))
        cache.finish("questions")
    return read_jsonl(cache.out / "questions" / "questions.jsonl")


def answers_stage(cache: Cache, config: DemoConfig, lm, questions: list[dict]) -> list[dict]:
    from ..facts.answers import answer_questions

    if not cache.fresh("answers"):
        out = cache.start("answers")
        rows = answer_questions(lm, questions, samples=config.samples, temperature=config.temperature,
                                seed=config.seed, progress=True)
        write_jsonl(out / "answers.jsonl", rows)
        cache.finish("answers")
    return read_jsonl(cache.out / "answers" / "answers.jsonl")


def probe_stage(cache: Cache, config: DemoConfig, lm, rows: list[dict]) -> tuple[Path, dict]:
    from ..model.lora import LoRAConfig
    from ..probe.benchmark import BenchmarkConfig, run_benchmark
    from ..probe.probe import ProbeConfig, save_probe

    if not cache.fresh("probe"):
        out = cache.start("probe")
        split_rows = _split_rows(rows, config)
        bench = BenchmarkConfig(layers=config.layers, n_boot=config.n_boot, seed=config.seed, progress=True,
                                lora=LoRAConfig(r=16, alpha=32, dropout=0.05) if config.lora_steps else None,
                                lora_steps=config.lora_steps)
        result = run_benchmark(lm.model, lm.tokenizer, split_rows, pad_id(lm.tokenizer), bench)
        chosen = result.selection.config
        probe_config = ProbeConfig(chosen.layer, lm.config.dim, lm.config.n_layers, alignment=chosen.alignment)
        save_probe(out / "probe", result.head, probe_config, lm.model, lm.family)
        if result.lora_head is not None:
            save_probe(out / "probe_lora", result.lora_head, probe_config, result.lora_model, lm.family)
        write_jsonl(out / "test_questions.jsonl", _held_out_examples(split_rows["test"]))
        result.report["choice"]["n_layers"] = lm.config.n_layers
        write_json(out / "benchmark.json", result.report, indent=1, sort_keys=False)
        cache.finish("probe")
    return cache.out / "probe" / "probe", read_json(cache.out / "probe" / "benchmark.json")


def demo_splits(rows: list[dict], config: DemoConfig) -> dict[str, set]:
    """The demo's entity split ("train", "validation", "test" -> entities) of its answer rows with claims."""
    from ..facts.splits import split_entities

    return split_entities([r for r in rows if r["annotations"]], config.seed, config.split)


def _split_rows(rows: list[dict], config: DemoConfig) -> dict[str, list[dict]]:
    """{"train", "val", "test"} -> annotated answers; an entity's answers of every type land on one side (a
    country's capital and profile answers alike)."""
    from ..facts.splits import rows_in

    annotated = [r for r in rows if r["annotations"]]
    splits = demo_splits(rows, config)
    return {name: rows_in(annotated, splits[key]) for name, key in (("train", "train"), ("val", "validation"),
                                                                    ("test", "test"))}


def held_out(out: Path, config: DemoConfig | None = None) -> tuple[Path, list[dict]]:
    """A finished demo's probe directory and the test answers its benchmark reported on (the same split)."""
    config = config or DemoConfig()
    probe, answers = out / "probe" / "probe", out / "answers" / "answers.jsonl"
    if not (probe.is_dir() and answers.is_file()):
        raise FileNotFoundError(f"{out}: no finished demo (its probe and answers); run `lucidlm demo` first")
    return probe, _split_rows(read_jsonl(answers), config)["test"]


def _held_out_examples(test_rows: list[dict], n: int = 4) -> list[dict]:
    """Greedy test answers for the live show: a wrong one of each one-claim type, then a right one (long-form
    answers run to ~100 tokens, too long to watch stream in a demo that should start in seconds)."""
    from ..facts.questions import TYPES

    greedy = [r for r in test_rows if r["sample"] == 0 and not TYPES[r["type"]].long_form]
    wrong = {}
    for r in greedy:
        if any(a["label"] != "Supported" for a in r["annotations"]):
            wrong.setdefault(r["type"], r)
    right = [r for r in greedy if all(a["label"] == "Supported" for a in r["annotations"])]
    return (list(wrong.values())[:n - 1] + right[:1])[:n]


# --- the report -------------------------------------------------------------------------------------
def _ci(m: dict) -> str:
    if m["auroc"] != m["auroc"]:  # NaN: one class only
        return "—"
    return f"{m['auroc']:.2f}\n{m['lo']:.2f}–{m['hi']:.2f}"


def detection_table(block: dict, title: str) -> Table:
    """Rows: pooled, then each question type; columns: claims, accuracy, every method's AUROC [95% CI]."""
    methods = [m for m in NAMES if m in block["all"]]
    table = Table(title=title, caption="AUROC, and its 95% interval from a bootstrap over entities")
    for col in ("claims", "n", "true", *[SHORT[m] for m in methods]):
        table.add_column(col, justify="left" if col == "claims" else "right")
    for name, b in [("all", block["all"]), *block["by_type"].items()]:
        accuracy = "—" if b["accuracy"] is None else f"{b['accuracy']:.0%}"
        table.add_row(name, str(b["claims"]), accuracy, *[_ci(b[m]) for m in methods],
                      style="bold" if name == "all" else None)
    return table


def selective_table(selective: dict) -> Table:
    table = Table(title="selective answering (greedy test claims): accuracy of the claims kept, riskiest withheld")
    table.add_column("risk measure")
    for r in (100, 80, 50):
        table.add_column(f"keep {r}%", justify="right")
    for m, s in selective.items():
        table.add_row(NAMES[m], *[f"{s[f'accuracy_at_{r}']:.1%}" for r in (100, 80, 50)])
    return table


def best_of_table(best: dict, n: int) -> Table:
    table = Table(title=f"best of {n} answers per test question: claim accuracy of the answer kept")
    table.add_column("answer kept")
    table.add_column("questions", justify="right")
    table.add_column("claims true", justify="right")
    for name, b in best.items():
        acc = "—" if b["claim_accuracy"] is None else f"{b['claim_accuracy']:.1%}"
        table.add_row(name, str(b["questions"]), acc)
    return table


def accuracy_table(rows: list[dict]) -> Table:
    from ..facts.report import accuracy_by_type

    table = Table(title="what the model gets right (all answers, greedy and sampled)")
    for col in ("question type", "answers", "claims", "true", "hedged", "no claim"):
        table.add_column(col, justify="left" if col == "question type" else "right")
    for t, a in accuracy_by_type(rows).items():
        acc = "—" if a["accuracy"] is None else f"{a['accuracy']:.1%}"
        table.add_row(t, str(a["answers"]), str(a["claims"]), acc, str(a["hedged"]), str(a["no_claim"]))
    return table


def plots(report: dict, out: Path) -> None:
    import numpy as np

    from ..probe.plots import plot_attempt_curves, plot_auroc_per_layer, plot_roc

    claims = report["greedy_claims"]
    labels = np.array(claims["labels"])
    curves = {}
    for m, values in claims["scores"].items():
        values = np.array(values, dtype=float)
        ok = ~np.isnan(values)
        curves[NAMES[m]] = (values[ok], labels[ok])
    plot_roc(curves, out / "roc.png", title="greedy answers, held-out entities (span max)")
    plot_attempt_curves({NAMES[m]: s["curve"] for m, s in report["selective"].items()}, out / "attempt_curve.png")
    plot_auroc_per_layer(report["val_auroc_per_layer"], out / "auroc_per_layer.png",
                         ylabel="validation span-max AUROC")


def _stale(made: Path, source: Path) -> bool:
    return not made.exists() or made.stat().st_mtime < source.stat().st_mtime


def show_live(lm, examples: list[dict], console: Console) -> None:
    """Stream greedy answers to held-out questions, every token coloured by its live probe score."""
    from ..facts.answers import answer_row, prompt_ids, stops_for
    from ..facts.questions import TYPES

    console.rule("live, held-out entities: each token coloured by its probe score (green safe → red risky)")
    for row in examples:
        question = {k: row[k] for k in ("id", "type", "entity", "truth")} | {
            "question": row["conversation"][0]["content"], "aliases": row.get("aliases", [])}
        console.print(Text(f"Q: {question['question']}", style="bold"))
        line, pieces = Text("A: "), []
        for token in lm.stream(prompt_ids(lm, question), max_new_tokens=TYPES[row["type"]].max_new_tokens,
                               stop=stops_for(row["type"])):
            pieces.append(token.text)
            line.append(token.text, style=risk_color(token.score) if token.score is not None else "dim")
        console.print(line)
        graded = answer_row(question, "".join(pieces), 0)["annotations"]
        truth = Text("   graded: ")
        for a in graded:
            ok = a["label"] == "Supported"
            truth.append(f"{a['attribute']}={a['span']}", style="green" if ok else "red strike")
            if not ok:
                truth.append(f" (true: {', '.join(question['truth'][a['attribute']][:2])})", style="green")
            truth.append("  ")
        console.print(truth)


def run_demo(out: Path, config: DemoConfig, console: Console | None = None, live: bool = True) -> dict:
    """Every stage (cached), the benchmark tables, then live coloured answers. Returns report.json's content."""
    import lucidlm

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    cache = demo_cache(out, config)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def timed(stage: str, work):
        return timed_stage(cache, stage, work, console, timings)

    model_dir = timed("model", lambda: model_stage(cache, config))
    questions = timed("questions", lambda: questions_stage(cache, config))
    lm = None
    if not (cache.fresh("answers") and cache.fresh("probe")):
        # eager: its batches come in many step shapes, whose background compiles would compete with the answers
        # for the cores of a small machine on a cold cache
        lm = lucidlm.load(model_dir, dtype=config.dtype, device=config.device, compile="off")
    rows = timed("answers", lambda: answers_stage(cache, config, lm, questions))
    probe_dir, report = timed("probe", lambda: probe_stage(cache, config, lm, rows))

    reports = out / "report"
    reports.mkdir(exist_ok=True)
    if _stale(reports / "roc.png", cache.out / "probe" / "benchmark.json"):  # warm runs skip matplotlib
        plots(report, reports)
    choice = report["choice"]
    console.print(accuracy_table(rows))
    console.print(f"probe: block {choice['layer']} (0-based) of {choice['n_layers']}, alignment "
                  f"'{choice['alignment']}', L2 {choice['l2']:g} — chosen on validation entities "
                  f"(AUROC {choice['val_auroc']:.3f}); entities train/val/test: "
                  f"{report['entities']['train']}/{report['entities']['val']}/{report['entities']['test']}")
    if report.get("lora"):
        lora = report["lora"]
        console.print(f"LoRA probe: r {lora['r']} on blocks 0..{lora['layer']}, {lora['steps']} steps, KL weight "
                      f"{lora['kl_weight']:g}; its cost to generation KL(base ‖ adapted) {lora['kl_test']:.4f} "
                      f"nats/token on test answers (validation AUROC {lora['val_auroc']:.3f})")
    console.print(detection_table(report["greedy"], "hallucination detection, greedy answers about held-out "
                                                    "entities: span-max AUROC [95% CI over entities]"))
    console.print(detection_table(report["value_disjoint"], "value-disjoint: test claims whose value was never "
                                                            "claimed in training"))
    console.print(selective_table(report["selective"]))
    console.print(best_of_table(report["best_of_n"], config.samples))
    if live:
        lm = lucidlm.load(model_dir, dtype=config.dtype, device=config.device, probe=probe_dir, compile="off")
        show_live(lm, read_jsonl(cache.out / "probe" / "test_questions.jsonl"), console)
    timings["total"] = time.perf_counter() - start
    summary = {"config": asdict(config), "benchmark": report, "seconds": timings}
    write_json(reports / "report.json", summary, indent=1, sort_keys=False)
    console.print(f"\nreport: {reports}/report.json  plots: roc.png attempt_curve.png auroc_per_layer.png  "
                  f"probe: {probe_dir}  model: {model_dir}  ({timings['total']:.0f}s)")
    console.print(f"try: lucidlm chat -m {model_dir} --probe {probe_dir}   or in a browser: lucidlm serve -m "
                  f"{model_dir} --probe {probe_dir}  (then open http://127.0.0.1:8000/)", style="dim", markup=False,
                  highlight=False)
    return summary
