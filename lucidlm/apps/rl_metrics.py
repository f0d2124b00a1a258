"""Hallucination measured before and after RL: how much of what the model says is true, how much it says,
and when it abstains — with the honest failure modes beside the headline.

``hallucination_metrics(rows, unknowable, known)`` over graded answer rows (the demos' answer rows, or
rollouts through ``rl_rewards.graded_row``):

    supported_rate          Σ supported claims / Σ claims
    claims_per_answer       Σ claims / answers                  (does it learn to say nothing?)
    no_claim_rate           answers with no claim and no abstention / answers
    abstention_unknowable   abstaining answers / answers, on entities it cannot know
    abstention_known        the same on entities it answered correctly before   (does it abstain on what it knew?)

each with a percentile bootstrap interval that resamples entities with replacement, as probe/claims.auroc_ci
does (an entity's answers — its samples, a country's capital and profile — are not independent).

Which entities it cannot know and which it knew (``knowledge_sets``): from answers sampled before training —
unknowable = no sample made a supported claim (for the world: the people never in the corpus,
``world_unknowable``, the ground truth of what it cannot know); known = more than ``known_share`` of the samples
made claims, all supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..jsonl import read_jsonl
from .rl_rewards import is_abstention


def row_key(row: dict) -> str:
    """The question (facts: its id) or person (world: the name) an answer row is about."""
    return str(row.get("id", row.get("name", "")))


def row_entity(row: dict) -> str:
    return str(row.get("entity", row.get("name", "")))


def row_answer(row: dict) -> str:
    return row["answer"] if "answer" in row else row["conversation"][-1]["content"]


def abstained(row: dict) -> bool:
    """An answer that makes no claim and abstains ("I know nothing about X.", a hedge)."""
    if "abstained" in row:
        return bool(row["abstained"])
    return not row["annotations"] and is_abstention(row_answer(row))


def knowledge_sets(rows: list[dict], known_share: float = 0.5) -> dict[str, set[str]]:
    """{"unknowable": keys no sample made a supported claim about, "known": keys where more than
    ``known_share`` of the samples made claims, all of them supported} (keys: ``row_key``)."""
    if not 0.0 <= known_share < 1.0:
        raise ValueError(f"known_share must be in [0, 1), got {known_share}")
    samples: dict[str, list[list[str]]] = {}
    for r in rows:
        samples.setdefault(row_key(r), []).append([a["label"] for a in r["annotations"]])
    unknowable = {k for k, s in samples.items() if not any("Supported" in labels for labels in s)}
    right = {k: sum(bool(labels) and all(x == "Supported" for x in labels) for labels in s) / len(s)
             for k, s in samples.items()}
    return {"unknowable": unknowable, "known": {k for k, share in right.items() if share > known_share}}


def world_unknowable(world: str | Path) -> set[str]:
    """The people of a built world who were never in its corpus (mentions 0): nothing to know them from."""
    path = Path(world) / "people.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{world}: no people.jsonl (not a world built by `lucidlm world build`)")
    return {r["name"] for r in read_jsonl(path) if r["mentions"] == 0}


def facts_knowledge(lm: Any, questions: list[dict], samples: int = 4, temperature: float = 0.7, seed: int = 0,
                    known_share: float = 0.5) -> tuple[dict[str, set[str]], list[dict]]:
    """(knowledge_sets, answer rows) of ``lm`` on ``questions``: greedy + ``samples − 1`` sampled answers
    each (facts/answers.answer_questions, the demo's answers stage)."""
    from ..facts.answers import answer_questions

    rows = answer_questions(lm, questions, samples=samples, temperature=temperature, seed=seed)
    return knowledge_sets(rows, known_share), rows


def ratio_ci(numer: np.ndarray, denom: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> dict:
    """Σ numer / Σ denom and its percentile bootstrap interval over ``groups`` resampled with replacement
    (a resample whose denominator is 0 is left out)."""
    numer, denom, groups = np.asarray(numer, float), np.asarray(denom, float), np.asarray(groups)
    if not numer.shape == denom.shape == groups.shape:
        raise ValueError(f"numer, denom and groups must have one shape, got {numer.shape}, {denom.shape}, "
                         f"{groups.shape}")
    total = float(denom.sum())
    out = {"n": total, "entities": int(len(np.unique(groups)))}
    if total == 0:
        return {**out, "value": float("nan"), "lo": float("nan"), "hi": float("nan")}
    names, member = np.unique(groups, return_inverse=True)
    by_num = np.bincount(member, numer, len(names))  # (entities,) sums per entity
    by_den = np.bincount(member, denom, len(names))
    draws = np.random.default_rng(seed).integers(0, len(names), (n_boot, len(names)))  # (n_boot, entities)
    num, den = by_num[draws].sum(1), by_den[draws].sum(1)
    stats = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2]) if len(stats) else (np.nan, np.nan)
    return {**out, "value": float(numer.sum() / total), "lo": float(lo), "hi": float(hi)}


def hallucination_metrics(rows: list[dict], unknowable: set[str], known: set[str], n_boot: int = 1000,
                          seed: int = 0, level: float = 0.95) -> dict:
    """{metric: {"value", "lo", "hi", "n", "entities"}} (the module docstring's table) + "answers"."""
    if not rows:
        raise ValueError("no answer rows to measure")
    claims = np.array([len(r["annotations"]) for r in rows], float)
    supported = np.array([sum(a["label"] == "Supported" for a in r["annotations"]) for r in rows], float)
    abstains = np.array([abstained(r) for r in rows], float)
    silent = ((claims == 0) & (abstains == 0)).astype(float)
    ones = np.ones(len(rows))
    groups = np.array([row_entity(r) for r in rows])
    on_unknowable = np.array([row_key(r) in unknowable for r in rows])
    on_known = np.array([row_key(r) in known for r in rows])

    def ci(numer: np.ndarray, denom: np.ndarray, keep: np.ndarray | None = None) -> dict:
        keep = np.ones(len(rows), bool) if keep is None else keep
        return ratio_ci(numer[keep], denom[keep], groups[keep], n_boot, seed, level)

    return {"answers": len(rows), "supported_rate": ci(supported, claims), "claims_per_answer": ci(claims, ones),
            "no_claim_rate": ci(silent, ones), "abstention_unknowable": ci(abstains, ones, on_unknowable),
            "abstention_known": ci(abstains, ones, on_known)}
