"""Grading an answer exactly: each claimed value against the truth, as annotations the probe reads.

A one-claim question's claim is the first value the answer states for its attribute (outside the
entity's own name); a long-form answer's claims are every value it ties to each known attribute.
A claim is "Supported" when one of the values its words may stand for is accepted by the truth —
"Not Supported" otherwise. An answer that hedges ("I don't know", "I'm not sure") gets no annotation:
there is no claim to be wrong about.
"""

from __future__ import annotations

import re

from .claims import FINDERS, Claim
from .normalize import Lexicon, Mention
from .questions import TYPES

HEDGE = re.compile(r"\b(?:I don'?t know|I do not know|I(?:'m| am) not (?:sure|aware|familiar)|not sure|"
                   r"I (?:cannot|can'?t|am unable to|'m unable to)|(?:no|any) (?:reliable )?information|"
                   r"I(?:'m| am) sorry|unknown to me|I don'?t have)\b", flags=re.I)


def is_hedge(answer: str) -> bool:
    return HEDGE.search(answer.replace("’", "'")) is not None


def entity_mentions(question: dict, answer: str) -> list[Mention]:
    aliases = question.get("aliases", [])
    return Lexicon({question["entity"]: aliases}).find(answer)


def claims(question: dict, answer: str) -> list[Claim]:
    """The claims ``answer`` makes about the question's attributes, in the answer's order."""
    qtype = TYPES[question["type"]]
    masks = entity_mentions(question, answer)
    found: list[Claim] = []
    for attribute in qtype.attributes:
        if attribute not in question["truth"]:
            continue
        mine = FINDERS[attribute](answer, masks, qtype.long_form)
        found += mine if qtype.long_form else mine[:1]
    taken: list[Claim] = []
    for c in sorted(found, key=lambda c: (c.start, -c.end)):
        if not any(c.start < t.end and t.start < c.end for t in taken):  # one span, one claim
            taken.append(c)
    return taken


def grade(question: dict, answer: str) -> list[dict]:
    """[{"span", "label", "index", "attribute", "value"}] with ``answer[index:index+len(span)] == span``."""
    if is_hedge(answer):
        return []
    out = []
    for c in claims(question, answer):
        accepted = set(question["truth"][c.attribute])
        label = "Supported" if c.values & accepted else "Not Supported"
        out.append({"span": answer[c.start:c.end], "label": label, "index": c.start, "attribute": c.attribute,
                    "value": c.value})
    return out
