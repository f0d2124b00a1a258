"""``lucidlm bench --guided``: probe-guided decoding (generate/probe_guided.py) on the demo's held-out questions.

A finished ``lucidlm demo`` gives the model, its trained probe and the test split (entities never seen in
training). Its greedy test questions are answered three ways, each answer graded exactly (facts/grader.py):

- plain: greedy decoding, every question answered;
- abstain: the answer is replaced by "I don't know." once a token's live score passes the threshold;
- resample: the flagged sentence is sampled k times (``temperature``) and the attempt with the lowest max score
  kept; an answer abstains when even that one passes the threshold.

Swept over thresholds (quantiles of the plain answers' max scores), each gives a point of accuracy (answers whose
claims are all true, among those given) against attempt rate (answers given, not abstained; a model's own hedge
counts as an abstention) — the accuracy-vs-attempt curve — with 95% bootstrap intervals over entities (probe/claims.py
resamples entities the same way). Abstain mode is exact from the plain answers: it abstains iff an answer's max
score passes the threshold (the live run only stops sooner; tests/apps/test_bench_guided.py checks it), so only
resample mode is run per threshold, and only on the answers that threshold flags (the others are the plain ones).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..generate.generation_config import GenerationConfig
from ..generate.probe_guided import GuidedConfig, GuidedResult, guided_generate


@dataclass
class GuidedBench:
    demo: Path = Path("runs/demo")
    out: Path = Path("runs/bench-guided")
    questions: int = 60  # held-out greedy questions (seeded draw)
    k: int = 3  # attempts per resampled sentence
    temperature: float = 0.7  # the attempts' (the demo's sampling temperature)
    quantiles: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # thresholds: these quantiles of the plain max scores
    long_form: bool = False  # also the profile questions (~100-token answers: slow)
    seed: int = 0
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if self.questions < 1 or self.k < 1 or self.n_boot < 1:
            raise ValueError(f"questions, k and n_boot must be >= 1, got {self.questions}, {self.k}, {self.n_boot}")
        if not self.quantiles or any(not 0 <= q <= 1 for q in self.quantiles):
            raise ValueError(f"quantiles must be in [0, 1], got {self.quantiles}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (k greedy attempts are one), got {self.temperature}")


def held_out_questions(demo: Path, n: int, seed: int, long_form: bool) -> tuple[Path, list[dict]]:
    """A finished demo's probe directory and ``n`` of its held-out questions (seeded draw, one per question id)."""
    from ..facts.questions import TYPES
    from .demo import held_out

    probe, rows = held_out(demo)
    questions = {r["id"]: {k: r[k] for k in ("id", "type", "entity", "truth")} | {
        "question": r["conversation"][0]["content"], "aliases": r.get("aliases", [])}
        for r in rows if r["sample"] == 0 and (long_form or not TYPES[r["type"]].long_form)}
    chosen = sorted(questions)
    random.Random(seed).shuffle(chosen)
    return probe, [questions[i] for i in chosen[:n]]


def _options(question: dict) -> dict:
    from ..facts.answers import stops_for
    from ..facts.questions import TYPES

    return {"max_new_tokens": TYPES[question["type"]].max_new_tokens, "stop": tuple(stops_for(question["type"]))}


def _groups(questions: list[dict]) -> dict[tuple, list[int]]:
    """Question indices by their generation options (one engine call each)."""
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(tuple(sorted(_options(q).items())), []).append(i)
    return groups


def answer(lm, questions: list[dict], prompts: list[list[int]], guided: GuidedConfig,
           which: list[int] | None = None) -> dict[int, GuidedResult]:
    """Guided answers (greedy decoding, sampled attempts) to the questions ``which`` (default all)."""
    which = set(range(len(questions)) if which is None else which)
    out: dict[int, GuidedResult] = {}
    for options, idx in _groups(questions).items():
        idx = [i for i in idx if i in which]
        if idx:
            config = GenerationConfig.from_kwargs(**dict(options))
            for i, r in zip(idx, guided_generate(lm.generator(), [prompts[i] for i in idx], config, guided)):
                out[i] = r
    return out


def graded(question: dict, result: GuidedResult) -> dict:
    """{"answered", "correct", "no_claim", "max_score"} of one answer (a hedge is an abstention)."""
    from ..facts.grader import grade, is_hedge

    text = result.text.strip()
    answered = not result.abstained and not is_hedge(text)
    claims = grade(question, text) if answered else []
    scores = [s for s in result.scores if s is not None]
    return {"answered": answered, "correct": answered and bool(claims) and all(c["label"] == "Supported"
                                                                              for c in claims),
            "no_claim": answered and not claims, "max_score": max(scores) if scores else float("inf"),
            "text": result.text}


def bootstrap_point(entities: np.ndarray, answered: np.ndarray, correct: np.ndarray, n_boot: int, seed: int,
                    level: float = 0.95) -> dict:
    """Attempt rate and accuracy of the answers given, each with a percentile interval from resampling entities
    with replacement (answers about one entity are not independent; probe/claims.py's ``auroc_ci`` does the same)."""
    names, member = np.unique(entities, return_inverse=True)
    by_entity = [np.flatnonzero(member == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    rates, accs = [], []
    for _ in range(n_boot):
        idx = np.concatenate([by_entity[g] for g in rng.integers(0, len(names), len(names))])
        rates.append(answered[idx].mean())
        if answered[idx].any():
            accs.append(correct[idx][answered[idx]].mean())
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    acc = float(correct[answered].mean()) if answered.any() else float("nan")
    acc_lo, acc_hi = np.quantile(accs, q) if accs else (float("nan"), float("nan"))
    rate_lo, rate_hi = np.quantile(rates, q)
    return {"n": int(len(answered)), "answered": int(answered.sum()), "correct": int(correct.sum()),
            "attempt_rate": float(answered.mean()), "attempt_lo": float(rate_lo), "attempt_hi": float(rate_hi),
            "accuracy": acc, "accuracy_lo": float(acc_lo), "accuracy_hi": float(acc_hi)}


def run_guided_bench(lm, questions: list[dict], config: GuidedBench, prompt: Callable[[dict], list[int]] | None = None,
                     print_fn: Callable[[str], None] = print) -> dict:
    """{"plain", "abstain": [points], "resample": [points], "answers", "seconds", "config"} for ``lm`` (with its
    probe) on ``questions``; ``prompt`` renders a question (default: the model's chat template, as the demo)."""
    from ..facts.answers import prompt_ids

    prompt = prompt or (lambda q: prompt_ids(lm, q))
    prompts = [prompt(q) for q in questions]
    entities = np.array([f"{q['type']}:{q['entity']}" for q in questions])
    start = time.perf_counter()
    plain = answer(lm, questions, prompts, GuidedConfig(threshold=1.0))
    plain_graded = [graded(q, plain[i]) for i, q in enumerate(questions)]
    maxima = np.array([g["max_score"] for g in plain_graded])
    thresholds = sorted({float(np.quantile(maxima[np.isfinite(maxima)], q)) for q in config.quantiles})
    print_fn(f"plain: {len(questions)} answers in {time.perf_counter() - start:.0f}s; thresholds "
             f"{', '.join(f'{t:.3f}' for t in thresholds)}")

    def point(rows: list[dict], threshold: float | None, **extra) -> dict:
        answered = np.array([r["answered"] for r in rows])
        correct = np.array([r["correct"] for r in rows])
        stats = bootstrap_point(entities, answered, correct, config.n_boot, config.seed)
        return {"threshold": threshold, **stats, "no_claim": sum(r["no_claim"] for r in rows), **extra}

    report = {"plain": point(plain_graded, None), "abstain": [], "resample": [], "answers": {"plain": plain_graded}}
    for t in thresholds:
        flagged = [i for i, m in enumerate(maxima) if m > t]
        report["abstain"].append(point([g | {"answered": g["answered"] and m <= t, "correct": g["correct"] and m <= t,
                                             "no_claim": g["no_claim"] and m <= t}
                                        for g, m in zip(plain_graded, maxima)], t))
        began = time.perf_counter()
        guided = GuidedConfig(threshold=t, mode="resample", k=config.k, temperature=config.temperature,
                              seed=config.seed)
        again = answer(lm, questions, prompts, guided, flagged)
        rows = [graded(q, again[i]) if i in again else plain_graded[i] for i, q in enumerate(questions)]
        rescued = sum(rows[i]["answered"] for i in flagged)
        report["resample"].append(point(rows, t, flagged=len(flagged), rescued=rescued,
                                        seconds=time.perf_counter() - began))
        report["answers"][f"resample@{t:.4f}"] = [rows[i] for i in flagged]
        print_fn(f"threshold {t:.3f}: {len(flagged)} flagged, resampling kept {rescued} of them "
                 f"({time.perf_counter() - began:.0f}s)")
    report["seconds"] = time.perf_counter() - start
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    report["questions"] = len(questions)
    return report


def _interval(p: dict, key: str) -> str:
    value, name = (p["attempt_rate"], "attempt") if key == "attempt" else (p[key], key)
    if value != value:  # NaN: nothing answered
        return "—"
    return f"{value:.0%} [{p[f'{name}_lo']:.0%}–{p[f'{name}_hi']:.0%}]"


def guided_table(report: dict) -> str:
    """Markdown: one row per method and threshold."""
    lines = ["| decoding | threshold | answered (attempt rate) | accuracy of answers given | flagged → kept |",
             "|---|---|---|---|---|"]
    p = report["plain"]
    lines.append(f"| plain (greedy) | — | {_interval(p, 'attempt')} | {_interval(p, 'accuracy')} | — |")
    for a, r in zip(report["abstain"], report["resample"]):
        t = f"{a['threshold']:.3f}"
        lines.append(f"| abstain | {t} | {_interval(a, 'attempt')} | {_interval(a, 'accuracy')} | "
                     f"{r['flagged']} → 0 |")
        lines.append(f"| resample best of {report['config']['k']} | {t} | {_interval(r, 'attempt')} | "
                     f"{_interval(r, 'accuracy')} | {r['flagged']} → {r['rescued']} |")
    lines.append(f"\n{report['questions']} held-out questions; 95% intervals from a bootstrap over entities; "
                 f"{report['seconds']:.0f}s.")
    return "\n".join(lines)


def plot_guided(report: dict, png: Path) -> Path:
    """Accuracy of the answers given vs attempt rate: abstain and resample curves, plain decoding as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic_io import atomic_write

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for name, points, style in (("abstain at threshold", report["abstain"], "o-"),
                                (f"resample, best of {report['config']['k']}", report["resample"], "s-")):
        x = [p["attempt_rate"] for p in points]
        y = [p["accuracy"] for p in points]
        err = [[p["accuracy"] - p["accuracy_lo"] for p in points], [p["accuracy_hi"] - p["accuracy"] for p in points]]
        ax.errorbar(x, y, yerr=err, fmt=style, ms=4, capsize=3, label=name)
        for p, xi, yi in zip(points, x, y):
            ax.annotate(f"{p['threshold']:.2f}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    p = report["plain"]
    ax.errorbar([p["attempt_rate"]], [p["accuracy"]], yerr=[[p["accuracy"] - p["accuracy_lo"]],
                                                           [p["accuracy_hi"] - p["accuracy"]]],
                fmt="k*", ms=10, capsize=3, label="plain (greedy)")
    ax.set(xlabel="attempt rate (answers given)", ylabel="accuracy of answers given", xlim=(0, 1.05),
           title=f"probe-guided decoding, {report['questions']} held-out questions")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png


def bench_guided(config: GuidedBench, print_fn: Callable[[str], None] = print) -> tuple[dict, str]:
    """The whole bench on a finished demo: report (JSON under ``config.out``), table, PNG."""
    import lucidlm

    from ..jsonl import write_json

    probe, questions = held_out_questions(config.demo, config.questions, config.seed, config.long_form)
    lm = lucidlm.load(config.demo / "model", probe=probe, compile="off")
    report = run_guided_bench(lm, questions, config, print_fn=print_fn)
    config.out.mkdir(parents=True, exist_ok=True)
    write_json(config.out / "guided.json", report, indent=1, sort_keys=False)
    png = plot_guided(report, config.out / "guided_decoding.png")
    return report, guided_table(report) + f"\n\nplot: {png}  report: {config.out / 'guided.json'}"
