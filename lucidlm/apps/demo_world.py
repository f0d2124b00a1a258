"""``lucidlm demo --world``: the exact-label sandbox. A small model learns a synthetic world, then a probe
learns when it is wrong.

The default world (world/build.py) is sized so that a 128-wide model trained for minutes on CPU knows
everyone it saw: 200 people, half never mentioned and the others 1–4 times, plus 400 strangers
answered "I know nothing about X." — so a claim is wrong exactly when its person was never in the
corpus, and the model's own P(abstain) on the question is the baseline to beat.

Stages, each cached under ``out`` and rebuilt only when its settings (or an earlier stage) change:

    world      fictional people; a corpus where mentions follow a power law   (world/build.py)
    tokenizer  byte-level BPE learned on the corpus, with a Q:/A: chat template
    lm         a small Llama-architecture model pretrained on the corpus       (train_recipes.py)
    answers    the model answers "Tell me about X." for everyone, greedy and sampled;
               every claim graded against the ground truth                      (world/answers.py)
    probe      a linear head on one block's residual stream, trained on the answers about half
               of the people                                                     (probe/train.py)
    report     on the other half: probe vs token NLL, entropy, the model's own probability of
               abstaining on the question (world/abstention.py) and a random head; selective
               answering (accuracy vs attempt rate); best-of-N by the probe       (probe/selective.py)

Then it streams a few answers with every token coloured by its live probe score.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..jsonl import read_jsonl, write_json, write_jsonl
from ..tokenizer import pad_id
from ..world.answers import accuracy_by_exposure
from .demo_cache import Cache, risk_color, stage_keys, timed_stage

# "Q: question\nA: answer" — the format of the corpus' Q&A documents, so pretraining alone teaches answering
QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: "
               "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")


@dataclass
class DemoConfig:
    seed: int = 0
    people: int = 200
    unseen: float = 0.5  # share of the people never mentioned in the corpus
    max_mentions: int = 4  # the most documents about one person
    strangers: float = 2.0  # × people: names outside the world, each in one "I know nothing about X." Q&A
    vocab_size: int = 1024
    dim: int = 128
    n_layers: int = 4
    lm_steps: int = 1500
    lm_lr: float = 2e-3
    samples: int = 3  # answers per person: greedy + sampled at temperature 1
    probe_layer: int = -2
    probe_steps: int = 400
    best_of: int = 4
    device: str = "auto"
    dtype: str = "float32"


STAGES = ("world", "tokenizer", "lm", "answers", "probe")
PROBE_VERSION = 2  # the probe's training changed: cached probes of earlier versions are retrained
ALIGNMENT = "own"  # token t scored from h[t], as the reference code (the real-model demo measures both)


def _stage_keys(config: DemoConfig) -> dict[str, str]:
    return stage_keys({
        "world": [config.seed, config.people, config.unseen, config.max_mentions, config.strangers],
        "tokenizer": [config.vocab_size, QA_TEMPLATE],
        "lm": [config.dim, config.n_layers, config.lm_steps, config.lm_lr],
        "answers": [config.samples, config.dtype],
        "probe": [config.probe_layer, config.probe_steps, PROBE_VERSION],
    })


def world_cache(out: Path, config: DemoConfig) -> Cache:
    return Cache(out, _stage_keys(config))


def split_people(names: list[str], seed: int) -> tuple[set[str], set[str]]:
    """Half the people train the probe, the other half evaluate it (no person is in both)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return set(order[: len(order) // 2]), set(order[len(order) // 2:])


# --- the stages -------------------------------------------------------------------------------------
def build_world_stage(cache: Cache, config: DemoConfig, console: Console) -> Path:
    from ..world.build import WorldConfig, build_world

    if not cache.fresh("world"):
        build_world(cache.start("world"), WorldConfig(seed=config.seed, people=config.people, unseen=config.unseen,
                                                      max_mentions=config.max_mentions, strangers=config.strangers))
        cache.finish("world")
    return cache.out / "world"


def build_tokenizer_stage(cache: Cache, config: DemoConfig, world: Path) -> Path:
    from ..train.tokenizer_training import train_bpe_tokenizer

    if not cache.fresh("tokenizer"):
        train_bpe_tokenizer([world / "corpus"], config.vocab_size, cache.start("tokenizer"), chat_template=QA_TEMPLATE)
        cache.finish("tokenizer")
    return cache.out / "tokenizer"


def train_lm_stage(cache: Cache, config: DemoConfig, world: Path, tokenizer: Path) -> Path:
    from ..train.trainer import TrainConfig
    from .train_recipes import ModelSpec, PretrainRun, run_pretrain

    if not cache.fresh("lm"):
        out = cache.out / "lm"
        if (out / "model").exists() or not (cache.out / "lm.partial").exists():
            cache.start("lm")  # a new run; an interrupted one (lm.partial) resumes from its checkpoint
            (cache.out / "lm.partial").write_text(cache.keys["lm"])
        model = ModelSpec(preset="llama-125m", dim=config.dim, n_layers=config.n_layers, n_heads=config.dim // 32,
                          n_kv_heads=config.dim // 64, ffn_dim=3 * config.dim, max_seq_len=512, seed=config.seed)
        train = TrainConfig(out_dir=str(out), max_steps=config.lm_steps, lr=config.lm_lr, warmup_steps=50,
                            save_every=100, eval_every=10**9, log_every=10, seed=config.seed, device=config.device,
                            progress=True)
        run_pretrain(PretrainRun(data=[str(world / "corpus")], tokenizer=str(tokenizer), block_size=256, batch_size=8,
                                 val_percent=0, model=model, train=train))
        (cache.out / "lm.partial").unlink(missing_ok=True)
        cache.finish("lm")
    return cache.out / "lm" / "model"


def answers_stage(cache: Cache, config: DemoConfig, world: Path, lm) -> tuple[list[dict], list[dict]]:
    """(probe-training rows, evaluation rows): every person answered, split by person."""
    from ..world.answers import generate_answers
    from ..world.build import read_people

    if not cache.fresh("answers"):
        out = cache.start("answers")
        prompts = read_jsonl(world / "prompts.jsonl")
        rows = generate_answers(lm, prompts, read_people(world), samples=config.samples, seed=config.seed,
                                progress=True)
        train_names, _ = split_people([p["name"] for p in prompts], config.seed)
        write_jsonl(out / "train.jsonl", [r for r in rows if r["name"] in train_names])
        write_jsonl(out / "eval.jsonl", [r for r in rows if r["name"] not in train_names])
        cache.finish("answers")
    return read_jsonl(cache.out / "answers" / "train.jsonl"), read_jsonl(cache.out / "answers" / "eval.jsonl")


def probe_stage(cache: Cache, config: DemoConfig, lm, train_rows: list[dict]) -> Path:
    from ..probe.data import label_row
    from ..probe.probe import ProbeConfig, save_probe
    from ..probe.train import ProbeTrainConfig, train_probe

    if not cache.fresh("probe"):
        out = cache.start("probe")
        n = lm.config.n_layers
        layer = config.probe_layer % n
        examples = [label_row(r, lm.tokenizer, max_len=lm.config.max_seq_len) for r in train_rows]
        train = ProbeTrainConfig(layer=layer, alignment=ALIGNMENT, steps=config.probe_steps, seed=config.seed,
                                 progress=True)
        head = train_probe(lm.model, examples, train, pad_id(lm.tokenizer))
        save_probe(out, head, ProbeConfig(layer, lm.config.dim, n, alignment=ALIGNMENT), lm.model, lm.family)
        cache.finish("probe")
    return cache.out / "probe"


# --- the report -------------------------------------------------------------------------------------
NAMES = {"probe": "probe (linear head)", "nll": "span max token NLL", "entropy": "span max entropy",
         "abstention": "P(abstain) on the question", "random_head": "random-init head"}


def evaluation(lm, eval_rows: list[dict], out: Path) -> tuple[dict, dict]:
    """(metrics report, per-method span-max arrays) on the evaluation people, plots into ``out``.

    Beside the probe's report (probe, NLL, entropy, random head): the abstention score, each answer's
    P(abstain) on its question given to every token, so a claim's span max is its answer's score."""
    import torch

    from ..probe.data import label_row
    from ..probe.evaluate import levels, method_scores, report, span_arrays
    from ..probe.features import extract
    from ..probe.plots import plot_reliability, plot_roc
    from ..world.abstention import abstention_scores

    examples = [label_row(r, lm.tokenizer, max_len=lm.config.max_seq_len) for r in eval_rows]
    layer, alignment = lm.probe.config.layer, lm.probe.config.alignment
    feats = extract(lm.model, examples, [layer], pad_id(lm.tokenizer), (alignment,))
    scores = method_scores(feats, lm.probe.head, layer, alignment)
    questions = [r["conversation"][0]["content"] for r in eval_rows]
    abstain = abstention_scores(lm, questions)
    per_row = torch.tensor([abstain[q] for q in questions], dtype=torch.float64)
    scores["abstention"] = per_row[feats.example]
    result = report(feats, scores, layer, alignment)
    baselines = result["baselines"]
    result["baselines"] = {"nll": baselines["nll"], "entropy": baselines["entropy"],
                           "abstention": levels(scores["abstention"], feats, True),
                           "random_head": baselines["random_head"]}
    methods = ("probe", *result["baselines"])
    arrays = {m: span_arrays(feats, scores[m]) for m in methods}
    plot_roc({NAMES[m]: arrays[m] for m in methods}, out / "roc.png")
    plot_reliability(*arrays["probe"], out / "reliability.png")
    return result, arrays


def metrics_table(result: dict) -> Table:
    table = Table(title="hallucination detection on held-out people (span max over each claim)")
    for col in ("method", "AUROC", "AUPRC", "recall @10% FPR", "best F1", "ECE"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = {"probe": result["probe"], **result["baselines"]}
    for name, levels in rows.items():
        m = levels["span_max"]
        ece = f"{m['ece']:.3f}" if "ece" in m else "—"
        style = "bold green" if name == "probe" else None
        table.add_row(NAMES[name], f"{m['auroc']:.3f}", f"{m['auprc']:.3f}", f"{m['recall_at_10fpr']:.3f}",
                      f"{m['best_f1']:.3f}", ece, style=style)
    return table


def attempt_table(arrays: dict, out: Path) -> tuple[Table, dict]:
    """Selective answering: a claim is stated only when its risk is low; accuracy at each attempt rate."""
    from ..probe.plots import plot_attempt_curves
    from ..probe.selective import accuracy_at, attempt_curve

    curves = {NAMES[m]: attempt_curve(s, y == 0) for m, (s, y) in arrays.items()}
    plot_attempt_curves(curves, out / "attempt_curve.png")
    rates = (1.0, 0.8, 0.6, 0.4)
    table = Table(title="selective answering: accuracy of the claims stated when the riskiest are withheld")
    table.add_column("risk measure")
    for r in rates:
        table.add_column(f"state {r:.0%}", justify="right")
    for name, rows in curves.items():
        table.add_row(name, *[f"{accuracy_at(rows, r):.1%}" for r in rates])
    return table, curves


def best_of_n(lm, eval_rows: list[dict], world: Path, n: int, seed: int) -> dict:
    """Claim accuracy on the evaluation people: greedy, one sample, and the best of ``n`` samples chosen
    by mean logprob or by the probe (lowest max score) — the same ``n`` samples for both choices."""
    from ..generate.generation_config import GenerationConfig
    from ..generate.strategies import mean_logprob
    from ..probe.selective import lowest_max_score
    from ..world.answers import answer_row, prompt_ids
    from ..world.build import read_people

    people = read_people(world)
    names = sorted({r["name"] for r in eval_rows})
    prompts = {p["name"]: p for p in read_jsonl(world / "prompts.jsonl")}
    chosen: dict[str, list[dict]] = {"one sample": [], "best of n by mean logprob": [], "best of n by probe": []}
    config = GenerationConfig.from_kwargs(max_new_tokens=56, stop=["\n"], temperature=1.0, seed=seed)
    for i in range(0, len(names), 32):
        batch = [prompts[name] for name in names[i:i + 32]]
        samples = lm.generator().generate([prompt_ids(lm, p) for p in batch], config, n=n)  # row j·n + k: sample k of j
        for j, p in enumerate(batch):
            mine = samples[j * n:(j + 1) * n]
            rows = [answer_row(p, people[p["name"]], c.text, k) for k, c in enumerate(mine)]
            chosen["one sample"].append(rows[0])
            chosen["best of n by mean logprob"].append(rows[max(range(n), key=lambda k: mean_logprob(mine[k]))])
            chosen["best of n by probe"].append(rows[max(range(n), key=lambda k: lowest_max_score(mine[k]))])
    return {k: _claim_accuracy(v) for k, v in chosen.items()}


def _claim_accuracy(rows: list[dict]) -> float:
    labels = [a["label"] == "Supported" for r in rows for a in r["annotations"]]
    return float(np.mean(labels)) if labels else float("nan")


def show_live(lm, world: Path, eval_rows: list[dict], console: Console, threshold: float = 0.5) -> list[str]:
    """Stream greedy answers for a few held-out people of each exposure, every token coloured by the
    score the probe gave it in the same decode step; the truth underneath, wrong claims struck out."""
    from ..probe.selective import flagged_spans
    from ..world.answers import answer_row, prompt_ids
    from ..world.build import read_people

    people = read_people(world)
    prompts = {p["name"]: p for p in read_jsonl(world / "prompts.jsonl")}
    picks = []
    for bucket in ("5+", "2-4", "1", "0"):
        names = sorted({r["name"] for r in eval_rows if r["exposure"] == bucket})
        picks += names[:1]
    console.rule("live: each token coloured by its probe score (green safe → red risky), from the same decode step")
    for name in picks:
        p = prompts[name]
        console.print(Text(f"Q: {p['question']}  (mentioned {p['mentions']}× in the corpus)", style="bold"))
        line = Text("A: ")
        line.append(p["prefix"], style="dim")
        pieces, scores = [], []
        for token in lm.stream(prompt_ids(lm, p), max_new_tokens=56, stop=["\n"]):
            pieces.append(token.text)
            scores.append(token.score)
            line.append(token.text, style=risk_color(token.score))
        console.print(line)
        row = answer_row(p, people[name], "".join(pieces), 0)
        truth = Text("   truth: ")
        for a, attribute in zip(row["annotations"], row["attributes"]):
            ok = a["label"] == "Supported"
            truth.append(f"{attribute}={a['span']}", style="green" if ok else "red strike")
            if not ok:
                truth.append(f" ({people[name].facts()[attribute]})", style="green")
            truth.append("  ")
        console.print(truth)
        flagged = flagged_spans(pieces, scores, threshold)
        if flagged:
            console.print("   flagged: " + ", ".join(f"{f.text.strip()!r} ({f.max_score:.2f})" for f in flagged),
                          style="yellow")
    return picks


def run_demo(out: Path, config: DemoConfig, console: Console | None = None) -> dict:
    """Every stage (cached), the evaluation report, then live coloured answers. Returns report.json's content."""
    import lucidlm

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    cache = world_cache(out, config)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def timed(stage: str, work):
        return timed_stage(cache, stage, work, console, timings)

    world = timed("world", lambda: build_world_stage(cache, config, console))
    tokenizer = timed("tokenizer", lambda: build_tokenizer_stage(cache, config, world))
    model_dir = timed("lm", lambda: train_lm_stage(cache, config, world, tokenizer))
    lm = lucidlm.load(model_dir, dtype=config.dtype, device=config.device, compile="off")  # batches: see demo.py
    train_rows, eval_rows = timed("answers", lambda: answers_stage(cache, config, world, lm))
    probe_dir = timed("probe", lambda: probe_stage(cache, config, lm, train_rows))
    lm = lucidlm.load(model_dir, dtype=config.dtype, device=config.device, probe=probe_dir, compile="off")

    began = time.perf_counter()
    reports = out / "report"
    reports.mkdir(exist_ok=True)
    result, arrays = evaluation(lm, eval_rows, reports)
    console.print(_world_table(train_rows + eval_rows, lm, config))
    console.print(metrics_table(result))
    attempts, curves = attempt_table(arrays, reports)
    console.print(attempts)
    best = best_of_n(lm, eval_rows, world, config.best_of, config.seed)
    console.print(_best_of_table(best, config.best_of))
    timings["report"] = time.perf_counter() - began
    shown = show_live(lm, world, eval_rows, console)
    timings["total"] = time.perf_counter() - start
    summary = {"config": asdict(config), "metrics": result, "selective_answering": curves, "best_of_n": best,
               "accuracy_by_exposure": accuracy_by_exposure(train_rows + eval_rows), "seconds": timings}
    write_json(reports / "report.json", summary, sort_keys=False)
    console.print(f"\nreport: {reports}/report.json  plots: roc.png reliability.png attempt_curve.png  "
                  f"probe: {probe_dir}  model: {model_dir}  ({timings['total']:.0f}s)")
    name = shown[-1] if shown else "Ada Vance"
    console.print(f"try: lucidlm generate -m {model_dir} --probe {probe_dir} --max-new-tokens 48 --stop $'\\n' "
                  f"$'Q: Tell me about {name}.\\nA: {name} was born in'", style="dim", markup=False, highlight=False)
    console.print(f"or chat with it in a browser: lucidlm serve -m {model_dir} --probe {probe_dir}  (then open "
                  "http://127.0.0.1:8000/)", style="dim", markup=False, highlight=False)
    return summary


def _world_table(rows: list[dict], lm, config: DemoConfig) -> Table:
    table = Table(title=f"what the {lm.model.num_parameters() / 1e6:.1f}M-parameter model knows "
                        f"(world seed {config.seed}, {config.people} people, "
                        f"{int(config.strangers * config.people)} strangers, {config.samples} answers each)")
    table.add_column("mentions in corpus")
    table.add_column("claims", justify="right")
    table.add_column("true", justify="right")
    for bucket, b in accuracy_by_exposure(rows).items():
        table.add_row(bucket, str(b["claims"]), f"{b['supported'] / max(1, b['claims']):.1%}")
    return table


def _best_of_table(best: dict, n: int) -> Table:
    table = Table(title=f"best-of-{n} on held-out people: claim accuracy of the answer kept")
    table.add_column("answer kept")
    table.add_column("claims true", justify="right")
    for name, acc in best.items():
        table.add_row(name.replace(" n ", f" {n} "), f"{acc:.1%}")
    return table
