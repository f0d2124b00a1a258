"""A probe measured on a claims benchmark, end to end: choose on validation entities, report on test entities.

    train / val / test rows (split by entity) ─label─▶ examples ─features.extract─▶ hidden states, NLL, entropy
    selection.select_probe: alignment × layer, then L2, by validation span-max AUROC
    test claims (claims.py): probe, the other alignment's best probe, NLL, entropy, random head,
                             claimed-value prior, sample disagreement — pooled, per type, value-disjoint,
                             bootstrap CIs over entities
    acting on the scores: selective answering (accuracy vs attempt rate), best-of-N among each question's answers
    optionally (config.lora): a LoRA probe at the chosen layer, alignment and L2, trained with the KL term on a
    copy of the model; its test scores beside the rest and its KL cost (nats per response token, on test)
    held_out_auroc: a trained probe's headline (greedy test claims) re-measured on another model's states, e.g.
    the same model with quantized weights

Rows follow claims.py (``type``, ``entity``, ``id``, ``sample``; annotations with ``value``/``attribute``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from ..model.lora import LoRAConfig
from ..progress import progress_bar
from ..tokenizer import Tokenizer
from .claims import Claims, add_sample_disagreement, add_value_prior, auroc_ci, claims, claims_report, value_disjoint
from .data import label_row
from .evaluate import random_head
from .features import TokenFeatures, extract
from .probe import ALIGNMENTS, ProbeConfig, ProbeHead
from .selection import Selection, select_probe, val_auroc
from .selective import accuracy_at, attempt_curve
from .train import ProbeTrainConfig, train_probe

METHODS = ("probe", "probe_lora", "probe_other_alignment", "nll", "entropy", "value_prior", "sample_disagreement",
           "random_head")


@dataclass
class BenchmarkConfig:
    layers: tuple[int, ...]  # blocks to sweep
    alignments: tuple[str, ...] = ALIGNMENTS
    steps: int = 100  # full-batch steps per head (Adam on standardised features converges fast)
    feature_dtype: torch.dtype = torch.float16  # stored features (memory: tokens × layers × alignments × dim)
    n_boot: int = 1000
    seed: int = 0
    progress: bool | None = None
    lora: LoRAConfig | None = None  # also a LoRA probe (blocks 0..layer adapted), None: frozen probes only
    lora_steps: int = 200
    lora_lr: float = 1e-4
    lora_head_lr: float = 1e-3  # the head starts trained (the frozen winner's), so a smaller step than from scratch
    kl_weight: float = 0.5


@dataclass
class BenchmarkResult:
    head: ProbeHead
    selection: Selection
    report: dict
    lora_model: nn.Module | None = None  # the adapted copy the LoRA probe reads (its head: lora_head)
    lora_head: ProbeHead | None = None


def _examples(rows: list[dict], tokenizer: Tokenizer, model: nn.Module):
    """Labelled examples, each cut to the model's context (a causal model's states for the kept tokens do not
    depend on what follows)."""
    return [label_row(r, tokenizer, max_len=model.config.max_seq_len) for r in rows]


def run_benchmark(model: nn.Module, tokenizer: Tokenizer, split_rows: dict[str, list[dict]], pad_id: int,
                  config: BenchmarkConfig) -> BenchmarkResult:
    """split_rows: {"train", "val", "test"} -> rows (each with at least one annotation)."""
    train_rows, val_rows, test_rows = split_rows["train"], split_rows["val"], split_rows["test"]
    feats = {}
    with progress_bar(3, "probe benchmark", config.progress) as advance:
        for name, rows in (("train", train_rows), ("val", val_rows)):
            feats[name] = extract(model, _examples(rows, tokenizer, model), list(config.layers), pad_id,
                                  config.alignments, dtype=config.feature_dtype, progress=config.progress)
            advance(1)
        base = ProbeTrainConfig(layer=config.layers[0], steps=config.steps, seed=config.seed)
        selection = select_probe(feats["train"], feats["val"], config.layers, config.alignments, base)
        other = _best_other_alignment(selection, feats, config)
        layers = sorted({selection.config.layer} | ({other[1].layer} if other else set()))
        feats["test"] = extract(model, _examples(test_rows, tokenizer, model), layers, pad_id, config.alignments,
                                progress=config.progress)
        advance(1)
    lora = _lora_probe(model, tokenizer, split_rows, selection, pad_id, config) if config.lora else None
    report = _report(selection, other, feats, split_rows, config, lora)
    return BenchmarkResult(selection.head, selection, report, *(lora[:2] if lora else (None, None)))


def held_out_auroc(model: nn.Module, tokenizer: Tokenizer, head: ProbeHead, probe: ProbeConfig,
                   test_rows: list[dict], pad_id: int, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Span-max AUROC of the greedy test claims, with a bootstrap CI over entities (the benchmark's headline), of
    ``head`` reading ``model``'s block ``probe.layer`` and of the model's own NLL: {"probe": auroc_ci, "nll": ...}.
    The rows' texts and labels stay as generated; only the states that score them come from ``model``."""
    feats = extract(model, _examples(test_rows, tokenizer, model), [probe.layer], pad_id, (probe.alignment,))
    with torch.no_grad():
        scores = {"probe": head.scores(feats.features(probe.layer, probe.alignment)), "nll": feats.nll}
    test = claims(test_rows, feats, scores)
    greedy = test.subset(test.meta["sample"] == 0)
    return {m: auroc_ci(greedy.scores[m], greedy.labels, greedy.meta["entity"], n_boot, seed) for m in scores}


def _lora_probe(model: nn.Module, tokenizer: Tokenizer, split_rows: dict, selection: Selection, pad_id: int,
                config: BenchmarkConfig) -> tuple[nn.Module, ProbeHead, dict[str, TokenFeatures]]:
    """The LoRA probe at the frozen winner's layer, alignment and L2, on a copy of the model (the caller's stays
    frozen and unadapted); features of val and test from the adapted copy (their lora_kl: the KL cost)."""
    chosen = selection.config
    train_cfg = replace(chosen, steps=config.lora_steps, lora=config.lora, lora_lr=config.lora_lr,
                        lr=config.lora_head_lr, kl_weight=config.kl_weight, progress=config.progress)
    adapted = copy.deepcopy(model)
    # from the frozen winner's head: the adapters then only have to add what the frozen layer lacks
    head = train_probe(adapted, _examples(split_rows["train"], tokenizer, model), train_cfg, pad_id, selection.head)
    feats = {name: extract(adapted, _examples(split_rows[name], tokenizer, model), [chosen.layer], pad_id,
                           (chosen.alignment,), progress=config.progress) for name in ("val", "test")}
    return adapted, head, feats


def _best_other_alignment(selection: Selection, feats: dict, config: BenchmarkConfig):
    """(head, config) of the best validation fit at the alignment that lost, retrained with the winner's L2."""
    others = [r for r in selection.table if r["alignment"] != selection.config.alignment]
    if not others:
        return None
    best = max(others, key=lambda r: r["val_auroc"])
    from .train import fit_head

    cfg = replace(selection.config, layer=best["layer"], alignment=best["alignment"])
    return fit_head(feats["train"].features(cfg.layer, cfg.alignment), feats["train"], cfg), cfg


def _token_scores(feats: TokenFeatures, selection: Selection, other, seed: int,
                  lora: tuple[nn.Module, ProbeHead, TokenFeatures] | None = None) -> dict[str, torch.Tensor]:
    """Per kept token, every method's score; ``lora``: (model, head, the adapted model's features of the same
    examples — extract keeps the same tokens in the same order, so its scores line up)."""
    cfg = selection.config
    x = feats.features(cfg.layer, cfg.alignment)
    with torch.no_grad():
        scores = {"probe": selection.head.scores(x), "nll": feats.nll, "entropy": feats.entropy,
                  "random_head": random_head(x.shape[1], seed).scores(x)}
        if other is not None:
            scores["probe_other_alignment"] = other[0].scores(feats.features(other[1].layer, other[1].alignment))
        if lora is not None:
            scores["probe_lora"] = lora[1].scores(lora[2].features(cfg.layer, cfg.alignment))
    return scores


def _lora_summary(lora, selection: Selection, config: BenchmarkConfig) -> dict:
    _, head, feats = lora
    cfg = selection.config
    return {"r": config.lora.r, "alpha": config.lora.alpha, "steps": config.lora_steps, "kl_weight": config.kl_weight,
            "layer": cfg.layer, "alignment": cfg.alignment, "l2": cfg.l2,
            "val_auroc": val_auroc(head, feats["val"], cfg.layer, cfg.alignment),
            "kl_test": feats["test"].lora_kl, "kl_val": feats["val"].lora_kl}


def _report(selection: Selection, other, feats: dict, split_rows: dict, config: BenchmarkConfig,
            lora=None) -> dict:
    lora_test = (lora[0], lora[1], lora[2]["test"]) if lora else None
    test_scores = _token_scores(feats["test"], selection, other, config.seed, lora_test)
    test_all = claims(split_rows["test"], feats["test"], test_scores)
    train = claims(split_rows["train"], feats["train"], {"nll": feats["train"].nll})
    add_value_prior(test_all, train)
    add_sample_disagreement(test_all, split_rows["test"])
    greedy = test_all.subset(test_all.meta["sample"] == 0)
    methods = [m for m in METHODS if m in test_all.scores]
    disjoint = greedy.subset(value_disjoint(greedy, train))
    sampled = test_all.subset(test_all.meta["sample"] > 0)
    per_layer: dict[str, dict[str, float]] = {}
    for r in selection.table:
        if r["l2"] == selection.table[0]["l2"]:
            per_layer.setdefault(r["alignment"], {})[str(r["layer"])] = r["val_auroc"]
    return {
        "choice": {**{k: v for k, v in asdict(selection.config).items() if k in ("layer", "alignment", "l2")},
                   "val_auroc": selection.val_auroc,
                   "other_alignment": None if other is None else {"alignment": other[1].alignment,
                                                                  "layer": other[1].layer}},
        "val_auroc_per_layer": per_layer, "selection_table": selection.table,
        "entities": {k: len({r["entity"] for r in v}) for k, v in split_rows.items()},
        "greedy": claims_report(greedy, methods, config.n_boot, config.seed),
        "value_disjoint": claims_report(disjoint, methods, config.n_boot, config.seed),
        "sampled": claims_report(sampled, [m for m in methods if m != "sample_disagreement"], config.n_boot,
                                 config.seed) if len(sampled) else None,
        "lora": _lora_summary(lora, selection, config) if lora else None,
        "selective": _selective(greedy, methods),
        "best_of_n": _best_of_n(split_rows["test"], feats["test"], test_scores["probe"], config.seed),
        "greedy_claims": {"labels": greedy.labels.tolist(), "type": greedy.meta["type"].tolist(),
                          "scores": {m: greedy.scores[m].tolist() for m in methods}},
    }


def _selective(test: Claims, methods: list[str]) -> dict:
    out = {}
    for m in methods:
        ok = ~np.isnan(test.scores[m])
        if not ok.any():  # e.g. sample disagreement without sampled answers
            continue
        curve = attempt_curve(test.scores[m][ok], test.labels[ok] == 0)
        out[m] = {"curve": curve, **{f"accuracy_at_{int(r * 100)}": accuracy_at(curve, r) for r in (1.0, 0.8, 0.5)}}
    return out


def _best_of_n(rows: list[dict], feats: TokenFeatures, probe: torch.Tensor, seed: int) -> dict:
    """Per question, the answer kept among its greedy and sampled answers: claim accuracy of the kept answers.
    Risk of an answer = its highest token score (the probe) or its mean token NLL (= −mean logprob)."""
    n = len(rows)
    top = torch.full((n,), float("-inf")).scatter_reduce(0, feats.example, probe.float(), "amax")
    nll_sum = torch.zeros(n).scatter_add(0, feats.example, feats.nll.float())
    count = torch.zeros(n).scatter_add(0, feats.example, torch.ones_like(feats.nll.float()))
    mean_nll = (nll_sum / count.clamp_min(1)).tolist()
    by_question: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_question.setdefault(r["id"], []).append(i)
    rng = np.random.default_rng(seed)
    kept: dict[str, list[int]] = {"greedy": [], "a random answer": [], "lowest mean NLL": [], "lowest max probe": []}
    for ids in by_question.values():
        if len(ids) < 2:
            continue
        kept["greedy"].append(min(ids, key=lambda i: rows[i]["sample"]))
        kept["a random answer"].append(int(rng.choice(ids)))
        kept["lowest mean NLL"].append(min(ids, key=lambda i: mean_nll[i]))
        kept["lowest max probe"].append(min(ids, key=lambda i: float(top[i])))
    out = {}
    for name, chosen in kept.items():
        labels = [a["label"] == "Supported" for i in chosen for a in rows[i]["annotations"]]
        out[name] = {"questions": len(chosen), "claim_accuracy": float(np.mean(labels)) if labels else None}
    return out
