"""Reading a model's answer back against the ground truth: every stated attribute becomes an annotation.

The answer format (``texts.answer``) is fixed, so each claim sits at a known place: a regular
expression per attribute finds the value the model wrote and its character offset. A value equal to
the truth is "Supported", any other "Not Supported" — including every claim about a person the
model never saw. Claims the answer does not make are not annotated.
"""

from __future__ import annotations

import re

from .people import Person

PATTERNS = {
    "birth_year": r"was born in (\d{4})",
    "birthplace": r"was born in \d{4} in ([A-Z][\w ]*?)\.",
    "field": r"studied ([a-z]+) at",
    "university": r"studied [a-z]+ at ([A-Z][\w ]*?) and works",
    "employer": r"and works at ([A-Z][\w ]*?)\.",
    "award": r"received the ([A-Z][\w ]*?) in \d{4}",
    "award_year": r"received the [A-Z][\w ]*? in (\d{4})",
}


def annotate(person: Person, answer: str) -> list[dict]:
    """[{"span", "label", "index", "attribute"}] for each attribute value found in ``answer``."""
    truth = person.facts()
    out = []
    for attribute, pattern in PATTERNS.items():
        m = re.search(pattern, answer)
        if m is None:
            continue
        value = m.group(1)
        out.append({"span": value, "label": "Supported" if value == truth[attribute] else "Not Supported",
                    "index": m.start(1), "attribute": attribute})
    return out
