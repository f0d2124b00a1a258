"""RL prompt sets from the two benchmarks, split by entity so that RL trains on some entities and the
before/after tables are measured on others.

- ``world_rl_prompts``: "Tell me about X." for the people of a built world, halved by
  ``demo_world.split_people`` (the demo's probe split: "train" its probe-training half, "eval" the other).
  ``meta``: name, mentions, exposure and ``knowable`` = the person was in the corpus (mentions > 0) — a person
  never mentioned is one the model cannot know. ``form``: "messages" (default) the question alone, as chat
  messages the trainer renders — the demo's forced opening "X was born in" (``world.texts.answer_prefix``) takes
  away the choice to abstain (world/abstention.py), which is what RL is to teach; "text" the rendered question
  with the template's trailing space left to the answer, as world/abstention.abstention_context reads
  P(abstain) (the Q:/A: template ends in "A: ", a lone space token the corpus never has: it wrote "A: I know"
  as "A", ":", " I"); "prefix" the demo's prompt exactly (the rendered question + the opening, as
  world/answers.prompt_ids encodes it). "text" and "prefix" need the model's tokenizer.
- ``facts_rl_prompts``: the facts questions as the demo asks them (facts/answers.prompt_ids: the question as the
  one user message; the model's chat template adds the rest), the entities split by ``facts.splits.split_entities``
  (a country's capital and profile questions on one side). ``meta``: the question (id, type, entity, truth,
  aliases) for the grader, its type's max_new_tokens and stop strings, and ``knowable`` = the id is not in
  ``unknowable`` (questions the model got wrong in every sample before training: rl_metrics.knowledge_sets).

``write_prompts_jsonl`` writes them as ``lucidlm rl --prompts`` reads them: {"messages": [...], "meta": {...}}
(or {"prompt": text, "meta": ...}) rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..facts.answers import stops_for
from ..facts.questions import TYPES
from ..facts.splits import SPLITS, split_entities
from ..jsonl import read_jsonl, write_jsonl
from ..train.rewards import RLPrompt
from .demo_world import split_people

WORLD_SPLITS = ("train", "eval", "all")
WORLD_FORMS = ("messages", "text", "prefix")


def world_rl_prompts(world: str | Path, split: str = "train", seed: int = 0, form: str = "messages",
                     tokenizer: Any = None) -> list[RLPrompt]:
    """One prompt per person of the world in ``world`` (its prompts.jsonl) on ``split``'s side of the demo's
    split (seeded by ``seed``, the demo's world seed), in ``form`` (the module docstring)."""
    if split not in WORLD_SPLITS:
        raise ValueError(f"world split must be one of {WORLD_SPLITS}, got {split!r}")
    if form not in WORLD_FORMS:
        raise ValueError(f"world prompt form must be one of {WORLD_FORMS}, got {form!r}")
    if form != "messages" and tokenizer is None:
        raise ValueError(f"form={form!r} renders the chat template: pass the model's tokenizer")
    path = Path(world) / "prompts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{world}: no prompts.jsonl (not a world built by `lucidlm world build`)")
    rows = read_jsonl(path)
    train, held_out = split_people([r["name"] for r in rows], seed)
    keep = {"train": train, "eval": held_out, "all": train | held_out}[split]
    out = []
    for r in rows:
        if r["name"] not in keep:
            continue
        meta = {"source": "world", "id": r["name"], "name": r["name"], "entity": r["name"], "mentions": r["mentions"],
                "exposure": r["exposure"], "knowable": r["mentions"] > 0}
        messages = ({"role": "user", "content": r["question"]},)
        if form == "messages":
            out.append(RLPrompt(messages=messages, meta=meta))
            continue
        head = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        if form == "prefix":
            out.append(RLPrompt(text=head + r["prefix"], meta=meta | {"prefix": r["prefix"]}))
        else:
            out.append(RLPrompt(text=head.rstrip(" "), meta=meta))
    return out


def facts_rl_prompts(questions: list[dict], unknowable: set[str], split: str = "train", seed: int = 0,
                     fractions: tuple[float, float, float] = (0.5, 0.15, 0.35),
                     splits: dict[str, set] | None = None, system: str | None = None) -> list[RLPrompt]:
    """The questions whose entity is on ``split``'s side ("train", "validation", "test") of
    ``split_entities(questions, seed, fractions)`` — or of ``splits`` when given (e.g. the demo's split of its
    answer rows, to keep the probe's test entities held out); a question in ``unknowable`` (ids) gets
    ``knowable`` False. ``system``: a system message before each question (e.g. one that allows "I don't
    know": a model that never abstains gives RL no abstention to reinforce)."""
    if split not in SPLITS:
        raise ValueError(f"facts split must be one of {SPLITS}, got {split!r}")
    unknown = sorted({q.get("type") for q in questions} - set(TYPES), key=str)
    if unknown:
        raise ValueError(f"unknown question types {unknown}")
    sides = splits if splits is not None else split_entities(questions, seed, fractions)
    if split not in sides:
        raise ValueError(f"the splits given have no {split!r} side (they have {sorted(sides)})")
    out = []
    for q in questions:
        if q["entity"] not in sides[split]:
            continue
        meta = {"source": "facts", "id": q["id"], "type": q["type"], "entity": q["entity"], "truth": q["truth"],
                "aliases": q.get("aliases", []), "knowable": q["id"] not in unknowable,
                "max_new_tokens": TYPES[q["type"]].max_new_tokens, "stop": stops_for(q["type"])}
        head = ({"role": "system", "content": system},) if system else ()
        out.append(RLPrompt(messages=(*head, {"role": "user", "content": q["question"]}), meta=meta))
    return out


def demo_facts_rl_prompts(demo: str | Path, split: str = "train", system: str | None = None,
                          types: tuple[str, ...] | None = None) -> list[RLPrompt]:
    """``facts_rl_prompts`` for a finished ``lucidlm demo`` (its questions/ and answers/): the demo's entity split
    of its answers (so "test" is the probe's held-out side), ``knowable`` False for the questions the demo's model
    got wrong in every sample (rl_metrics.knowledge_sets). ``types``: default the one-claim types."""
    from .demo import DemoConfig, demo_splits
    from .rl_metrics import knowledge_sets

    demo = Path(demo)
    questions_file, answers_file = demo / "questions" / "questions.jsonl", demo / "answers" / "answers.jsonl"
    if not (questions_file.is_file() and answers_file.is_file()):
        raise FileNotFoundError(f"{demo}: no finished demo (questions/ and answers/); run `lucidlm demo` first")
    types = types or tuple(name for name, t in TYPES.items() if not t.long_form)
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        raise ValueError(f"unknown question types {unknown}; known: {sorted(TYPES)}")
    questions = [q for q in read_jsonl(questions_file) if q["type"] in types]
    answers = read_jsonl(answers_file)
    unknowable = knowledge_sets([r for r in answers if r["type"] in types])["unknowable"]
    splits = demo_splits(answers, DemoConfig())  # over all its answers, as the demo split them
    return facts_rl_prompts(questions, unknowable, split, splits=splits, system=system)


def prompt_row(prompt: RLPrompt) -> dict:
    head = {"messages": [dict(m) for m in prompt.messages]} if prompt.messages else {"prompt": prompt.text}
    return head | {"meta": prompt.meta}


def write_prompts_jsonl(path: str | Path, prompts: list[RLPrompt]) -> Path:
    """Prompts as JSONL rows ({"messages" | "prompt", "meta"}: train/rl_rollouts.read_prompts' format), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [prompt_row(p) for p in prompts])
    return path


def read_prompts_jsonl(path: str | Path) -> list[RLPrompt]:
    """The rows ``write_prompts_jsonl`` writes, back as prompts; a bad row is named by its line."""
    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("meta", {}), dict):
            raise ValueError(f"{path}:{i}: 'meta' must be an object")
        try:
            out.append(RLPrompt(messages=tuple(row.get("messages", ())), text=row.get("prompt"),
                                meta=row.get("meta", {})))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    return out
