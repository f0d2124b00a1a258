"""Decoding strategies built on N samples: best-of-N and self-consistency.

- best-of-N: sample N completions, keep the one a scorer likes best. The default scorer is the
  mean token log-probability (length-neutral confidence); probe/selective.py's ``lowest_max_score``
  plugs in the hallucination probe's score instead.
- self-consistency (Wang et al. 2022): sample N reasoning paths, extract each one's final answer,
  return the majority answer. Agreement across samples is itself a confidence signal.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .events import Completion

Scorer = Callable[[Completion], float]
AnswerExtractor = Callable[[str], str | None]


def mean_logprob(completion: Completion) -> float:
    return completion.mean_logprob


def best_of(samples: Sequence[Completion], scorer: Scorer = mean_logprob) -> Completion:
    """The highest-scoring sample (first one on ties); its ``score`` is set."""
    if not samples:
        raise ValueError("best_of needs at least one sample")
    scored = [(scorer(c), i) for i, c in enumerate(samples)]
    score, index = max(scored, key=lambda si: (si[0], -si[1]))
    best = samples[index]
    best.score = score
    return best


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The default answer extractor: the last number in the text, without thousands separators."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


@dataclass
class Vote:
    answer: str | None  # the majority answer (None when no sample gave one)
    counts: dict[str, int]  # answer -> how many samples gave it
    agreement: float  # share of all samples that gave the majority answer
    samples: list[Completion]


def majority_vote(samples: Sequence[Completion], extract: AnswerExtractor = last_number) -> Vote:
    """Self-consistency: the most frequent extracted answer (first seen wins ties)."""
    if not samples:
        raise ValueError("majority_vote needs at least one sample")
    answers = [extract(c.text or "") for c in samples]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, {}, 0.0, list(samples))
    top = max(counts.values())
    answer = next(a for a in answers if a is not None and counts[a] == top)
    return Vote(answer, dict(counts), top / len(samples), list(samples))
