"""A model answers the questions in its own words, and every answer is graded: annotated rows for probes.

Each question is rendered with the model's chat template (SmolLM2's adds its default system prompt)
and answered greedily (sample 0), then ``samples - 1`` times at ``temperature`` — a model that
half-knows a fact is right in some samples and wrong in others. The samples of one prompt share its
prefill (the engine copies the prompt's KV slot). Questions are batched by type, so each batch stops
at its type's ``max_new_tokens``, and by prompt length, so little is padding. ``lm`` is duck-typed:
anything with ``tokenizer.apply_chat_template`` and ``generate`` (a lucidlm ``LM``; its engine for samples).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..generate.generation_config import GenerationConfig
from ..progress import progress_bar
from .grader import grade, is_hedge
from .questions import TYPES


def prompt_ids(lm, question: dict) -> list[int]:
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": question["question"]}],
                                            add_generation_prompt=True, tokenize=True)


def stops_for(type_name: str) -> list[str]:
    """One-claim answers end at their first line; long-form ones may run over paragraphs (until max_new_tokens)."""
    return [] if TYPES[type_name].long_form else ["\n"]


def answer_row(question: dict, text: str, sample: int) -> dict:
    """The probe data format (``lucidlm.probe.data``) plus what reports and re-grading need."""
    answer = text.strip()
    return {"id": question["id"], "type": question["type"], "entity": question["entity"], "sample": sample,
            "conversation": [{"role": "user", "content": question["question"]},
                             {"role": "assistant", "content": answer}],
            "annotations": grade(question, answer), "hedged": is_hedge(answer), "truth": question["truth"],
            "aliases": question.get("aliases", [])}


def regrade(row: dict) -> dict:
    """The row graded again from its own truth (after the grader changed)."""
    question = {"type": row["type"], "entity": row["entity"], "truth": row["truth"], "aliases": row.get("aliases", [])}
    answer = row["conversation"][-1]["content"]
    return row | {"annotations": grade(question, answer), "hedged": is_hedge(answer)}


def batches(questions: list[dict], size: int) -> Iterator[list[int]]:
    """Indices of questions of one type, of similar prompt length, ``size`` at a time."""
    by_type: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_type.setdefault(q["type"], []).append(i)
    for idx in by_type.values():
        idx.sort(key=lambda i: len(questions[i]["question"]))
        for start in range(0, len(idx), size):
            yield idx[start:start + size]


def answer_questions(lm, questions: list[dict], samples: int = 1, temperature: float = 0.7, seed: int = 0,
                     batch_size: int = 32, progress: bool | None = None) -> list[dict]:
    """``samples`` graded answers per question, in question order, greedy first (sample 0)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    unknown = sorted({q["type"] for q in questions} - set(TYPES))
    if unknown:
        raise ValueError(f"unknown question types {unknown}")
    texts: dict[tuple[int, int], str] = {}
    with progress_bar(len(questions) * samples, "answering", enabled=progress) as advance:
        for b, idx in enumerate(batches(questions, batch_size)):
            qtype = questions[idx[0]]["type"]
            ids = [prompt_ids(lm, questions[i]) for i in idx]
            options = {"max_new_tokens": TYPES[qtype].max_new_tokens, "stop": stops_for(qtype)}
            # the greedy answer and the samples of a question share its prefill and decode together; sample j
            # draws from seed + j: distinct per batch, reproducible per call
            sampled = GenerationConfig.from_kwargs(**options, temperature=temperature, seed=seed * 1_000_003 + b * 1000)
            choices = [(GenerationConfig.from_kwargs(**options), 0)] + [(sampled, j) for j in range(samples - 1)]
            done = lm.generator().generate_choices(ids, choices)
            for k, i in enumerate(idx):
                for j in range(samples):
                    texts[i, j] = done[k * samples + j].text
            advance(len(idx) * samples)
    return [answer_row(q, texts[i, s], s) for i, q in enumerate(questions) for s in range(samples)]
