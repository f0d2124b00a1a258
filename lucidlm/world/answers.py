"""A model answers the world's questions, and the labeler grades every claim: annotated JSONL for probes.

Each prompt is rendered with the model's chat template and followed by the forced opening
(``texts.answer_prefix``: the person's name), so every answer is about the person asked. The first
answer per prompt is greedy, the others sampled — a model that half-knows a person is right in some
samples and wrong in others. Rows are in the probe data format (``lucidlm.probe.data``) plus the
person, exposure bucket, sample index and each annotation's attribute, for reports.
"""

from __future__ import annotations

from ..progress import progress_bar
from .labeler import annotate
from .people import Person


def prompt_ids(lm, prompt: dict) -> list[int]:
    """Chat-template the question and append the forced opening of the answer."""
    head = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt["question"]}],
                                            add_generation_prompt=True)
    return lm.encode(head + prompt["prefix"])


def answer_row(prompt: dict, person: Person, completion_text: str, sample: int) -> dict:
    answer = (prompt["prefix"] + completion_text).split("\n")[0].strip()
    notes = annotate(person, answer)
    return {"conversation": [{"role": "user", "content": prompt["question"]}, {"role": "assistant", "content": answer}],
            "annotations": [{k: a[k] for k in ("span", "label", "index")} for a in notes],
            "attributes": [a["attribute"] for a in notes],
            "name": prompt["name"], "exposure": prompt["exposure"], "sample": sample}


def generate_answers(lm, prompts: list[dict], people: dict[str, Person], samples: int = 3, temperature: float = 1.0,
                     max_new_tokens: int = 56, seed: int = 0, batch_size: int = 64,
                     progress: bool | None = None) -> list[dict]:
    """``samples`` answers per prompt (greedy first, then sampled), each graded claim by claim."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    missing = [p["name"] for p in prompts if p["name"] not in people]
    if missing:
        raise ValueError(f"prompts about people missing from the ground truth: {missing[:3]}")
    ids = [prompt_ids(lm, p) for p in prompts]
    rows = []
    jobs = [(s, i) for s in range(samples) for i in range(0, len(prompts), batch_size)]
    with progress_bar(len(prompts) * samples, "answering", enabled=progress) as advance:
        for s, i in jobs:
            options = {"max_new_tokens": max_new_tokens, "stop": ["\n"]}
            if s > 0:
                options |= {"temperature": temperature, "seed": seed * 1000 + s * 100 + i // batch_size}
            batch = prompts[i:i + batch_size]
            for p, c in zip(batch, lm.generate(ids[i:i + batch_size], **options)):
                rows.append(answer_row(p, people[p["name"]], c.text, s))
            advance(len(batch))
    return rows


def accuracy_by_exposure(rows: list[dict]) -> dict[str, dict]:
    """{bucket: {"claims", "supported"}}: how much of what the model says is true, by exposure."""
    out: dict[str, dict] = {}
    for r in rows:
        b = out.setdefault(r["exposure"], {"claims": 0, "supported": 0})
        b["claims"] += len(r["annotations"])
        b["supported"] += sum(a["label"] == "Supported" for a in r["annotations"])
    return dict(sorted(out.items(), key=lambda kv: ["0", "1", "2-4", "5+"].index(kv[0])))
