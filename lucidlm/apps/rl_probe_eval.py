"""The base model's hallucination probe read on the model being measured (``lucidlm rl-eval --probe``): does the
probe still tell its wrong claims from its right ones after RL?

    rollout (prompt ids + the completion's own token ids, as generated)
        ─ the engine's detokenizer ─▶ each completion token's characters in the completion text
        ─ the grading's answer offset ─▶ in the graded answer, where the annotations' spans are
        ─ probe/data.token_labels (the probe data's span rule: characters overlap) ─▶ LabeledExample
        ─ probe/features.extract (one forward per batch) ─▶ h_L, token NLL ─▶ span max ─▶ AUROC over entities

Each claim span is scored on the tokens the model generated: never re-tokenized text, which can split differently
from what was sampled. A span's score is its tokens' maximum (probe/features.span_max, the probe's span-max level),
the label 1 for Not Supported; the baseline is the span's maximum token NLL from the same forward's LM logits. A
span with no generated token (inside a forced answer prefix, which is prompt) is counted, not scored. The AUROC's
95% interval resamples entities (probe/claims.auroc_ci), as every rl-eval metric does.

The probe is attached as ``lucidlm.load(..., probe=)`` attaches it (probe/probe.attach_probe: its shape and model
identity checked, so a probe made for another model is refused before any answer is generated). A LoRA probe is
refused: its adapter would change the model being measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..generate.text import IncrementalDetokenizer
from ..probe.claims import auroc_ci
from ..probe.data import LabeledExample, LabelStats, span_ranges, token_labels
from ..probe.features import extract, span_max
from ..probe.probe import LoadedProbe, attach_probe, load_probe
from ..tokenizer import Tokenizer, pad_id
from ..train.rewards import Rollout
from .rl_metrics import row_entity
from .rl_rewards import Grading

SCORED_LABELS = {"Supported": 0, "Not Supported": 1}


def attach_eval_probe(lm: Any, directory: str | Path) -> LoadedProbe:
    """The probe in ``directory`` on ``lm.model`` (shape and model identity checked); a LoRA probe is refused."""
    if load_probe(directory)[1].has_adapter:
        raise ValueError(f"{directory}: a LoRA probe changes the model it is attached to, so the answers would not "
                         "be the measured model's; rl-eval reads head-only probes")
    return attach_probe(lm.model, directory, getattr(lm, "family", None))


def token_offsets(tokenizer: Tokenizer, token_ids: Sequence[int]) -> tuple[list[tuple[int, int]], str]:
    """(each token's character range, the text) as the engine's detokenizer turns ``token_ids`` into text: tokens
    that together complete one piece (a UTF-8 character split over bytes) share that piece's range."""
    detok = IncrementalDetokenizer(tokenizer)
    offsets: list[tuple[int, int]] = []
    text, pending = "", 0
    for tok in token_ids:
        piece = detok.push(tok)
        pending += 1
        if piece:
            offsets += [(len(text), len(text) + len(piece))] * pending
            text, pending = text + piece, 0
    piece = detok.flush()
    offsets += [(len(text), len(text) + len(piece))] * pending
    return offsets, text + piece


def own_example(rollout: Rollout, row: dict, grading: Grading, tokenizer: Tokenizer) -> LabeledExample:
    """prompt + completion ids as generated, each completion token labelled by the graded answer's spans."""
    offsets, text = token_offsets(tokenizer, rollout.token_ids)
    if not text.startswith(rollout.text):
        raise ValueError(f"the completion's tokens decode to {text[:40]!r}, not its text {rollout.text[:40]!r}")
    stats = LabelStats()
    spans, span_labels = span_ranges(row["answer"], row["annotations"], 0, stats)
    if stats.missing_spans:
        raise ValueError(f"annotation spans {stats.missing} are not in the graded answer {row['answer'][:60]!r}")
    shift = grading.answer_offset(rollout.prompt.meta, rollout.text)  # answer[i] = text[i + shift]
    own = [(a - shift, b - shift) for a, b in offsets]
    prompt = [(-1, -1)] * len(rollout.prompt_ids)  # before the answer: ignored, in no span
    labels, span_ids = token_labels(prompt + own, spans, span_labels, 0)
    return LabeledExample(list(rollout.prompt_ids) + list(rollout.token_ids), labels, span_ids, span_labels)


@torch.no_grad()
def probe_spans(lm: Any, probe: LoadedProbe, rollouts: Sequence[Rollout], rows: Sequence[dict],
                grading: Grading, batch_size: int = 16) -> list[list[dict]]:
    """Per row, per annotation: {"span", "label", "probe", "nll", "tokens"}: the span-max probe score and token
    NLL (None: no generated token in the span) and the span's completion-token range [start, end)."""
    examples = [own_example(r, row, grading, lm.tokenizer) for r, row in zip(rollouts, rows, strict=True)]
    layer, alignment = probe.config.layer, probe.config.alignment
    feats = extract(lm.model, examples, [layer], pad_id(lm.tokenizer), (alignment,), batch_size, progress=False,
                    base_baselines=False)
    device = probe.head.linear.weight.device
    token_probe = probe.head.scores(feats.features(layer, alignment).to(device)).cpu()  # (N,)
    n = len(feats.span_labels)
    maxima = {m: span_max(v.double(), feats.span, n) for m, v in (("probe", token_probe), ("nll", feats.nll))}
    out: list[list[dict]] = [[] for _ in rows]
    for s in range(n):
        e, j = int(feats.span_example[s]), int(feats.span_index[s])
        a = rows[e]["annotations"][j]
        at = [t - len(rollouts[e].prompt_ids) for t, span in enumerate(examples[e].span_ids) if span == j]
        out[e].append({"span": a["span"], "label": a["label"], "tokens": [at[0], at[-1] + 1] if at else None,
                       **{m: float(v[s]) if torch.isfinite(v[s]) else None for m, v in maxima.items()}})
    return out


def probe_metrics(rows: Sequence[dict], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """{"probe_auroc", "nll_auroc": {"value", "lo", "hi", "n", "positives", "entities"}, "probe_spans",
    "probe_positives", "probe_unscored": {"value", "n"}} over the rows' ``probe_spans`` (Supported /
    Not Supported spans with a generated token)."""
    spans = [(row_entity(r), s) for r in rows for s in r["probe_spans"] if s["label"] in SCORED_LABELS]
    scored = [(g, s) for g, s in spans if s["probe"] is not None]
    labels = np.array([SCORED_LABELS[s["label"]] for _, s in scored], dtype=np.int64)
    groups = np.array([g for g, _ in scored], dtype=object)
    out = {}
    for method in ("probe", "nll"):
        scores = np.array([np.nan if s[method] is None else s[method] for _, s in scored], dtype=np.float64)
        ci = auroc_ci(scores, labels, groups, n_boot, seed, level)
        entities = len(set(groups[~np.isnan(scores)].tolist())) if len(scores) else 0
        out[f"{method}_auroc"] = {"value": ci.pop("auroc"), **ci, "entities": entities}

    def count(k: int) -> dict:
        return {"value": k, "n": k}

    return out | {"probe_spans": count(len(scored)), "probe_positives": count(int(labels.sum())),
                  "probe_unscored": count(len(spans) - len(scored))}
