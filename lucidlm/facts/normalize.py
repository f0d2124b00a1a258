"""Finding names in free text however they are spelled, with the exact characters they occupy.

Text and aliases are compared in a normal form — accents stripped (NFKD), case folded, curly
apostrophes straightened, hyphens as spaces, a leading "the" dropped from aliases — while an index map
keeps every normalised character tied to the original one, so a match maps back to the answer's own
characters. Acronyms ("USA", "U.S.", "UK", "JPY") match case-sensitively: "us" and "can" are words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_SUBSTITUTE = {"’": "'", "‘": "'", "`": "'", "-": " ", "‐": " ", "‑": " ", "–": " ", "—": " "}


def normalize_with_map(text: str) -> tuple[str, list[int]]:
    """(normal form, for each of its characters the index of the original character it came from)."""
    chars, where = [], []
    for i, c in enumerate(text):
        c = _SUBSTITUTE.get(c, c)
        for d in unicodedata.normalize("NFKD", c).casefold():
            if not unicodedata.combining(d):
                chars.append(d)
                where.append(i)
    return "".join(chars), where


def normalize(text: str) -> str:
    """The normal form of a name: what two spellings of one value share ("The Côte-d'Ivoire" -> "cote d'ivoire")."""
    text = re.sub(r"\s+", " ", normalize_with_map(text)[0]).strip()
    return re.sub(r"^the ", "", text)


def is_acronym(alias: str) -> bool:
    return bool(re.fullmatch(r"(?:[A-Z]\.?){2,4}", alias))


@dataclass(frozen=True)
class Mention:
    start: int  # character offsets in the original text
    end: int
    values: frozenset[str]  # canonical values this spelling may stand for


class Lexicon:
    """Canonical values and their spellings; ``find`` lists every mention, leftmost first, longest at a place."""

    def __init__(self, values: dict[str, Iterable[str]]) -> None:
        self.spellings: dict[str, set[str]] = {}  # normal form (or acronym as written) -> canonical values
        for value, aliases in values.items():
            for alias in {value, *aliases}:
                key = alias.strip() if is_acronym(alias.strip()) else normalize(alias)
                if key:
                    self.spellings.setdefault(key, set()).add(value)
        words = sorted((k for k in self.spellings if not is_acronym(k)), key=len, reverse=True)
        acronyms = sorted((k for k in self.spellings if is_acronym(k)), key=len, reverse=True)
        self._words = _alternation(words)
        self._acronyms = _alternation(acronyms, acronym=True)

    def find(self, text: str) -> list[Mention]:
        out = []
        if self._words is not None:
            normal, where = normalize_with_map(text)
            for m in self._words.finditer(normal):
                out.append(Mention(where[m.start()], where[m.end() - 1] + 1, frozenset(self.spellings[m.group()])))
        if self._acronyms is not None:
            for m in self._acronyms.finditer(text):
                out.append(Mention(m.start(), m.end(), frozenset(self.spellings[m.group()])))
        out.sort(key=lambda m: (m.start, -m.end))
        return _drop_nested(out)


def _alternation(keys: list[str], acronym: bool = False) -> re.Pattern | None:
    if not keys:
        return None
    body = "|".join(re.escape(k) for k in keys)
    # an acronym may end in "." ("U.S."), so only a following letter or digit breaks it
    return re.compile(rf"(?<![\w.])(?:{body})(?!\w)" if acronym else rf"(?<!\w)(?:{body})(?!\w)")


def _drop_nested(mentions: list[Mention]) -> list[Mention]:
    """Keep mentions not inside an earlier, longer one ("U.S." inside "U.S. dollar" is one mention)."""
    out: list[Mention] = []
    for m in mentions:
        if out and m.start < out[-1].end:
            continue
        out.append(m)
    return out


def numbers(text: str) -> list[tuple[int, int, int]]:
    """(start, end, value) of every whole number, commas as thousands separators ("1,803"); decimals skipped."""
    out = []
    for m in re.finditer(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w]|[.,]\d)", text):
        out.append((m.start(), m.end(), int(m.group().replace(",", ""))))
    return out
