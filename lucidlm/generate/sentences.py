"""Where sentences end in a stream of token texts, at token granularity (probe-guided decoding backs up to them).

The rule: a sentence ends after the first character of a boundary string, once the whole string has been seen.
With the default boundaries ". ", "? ", "! ", "\\n": "Paris. The" ends a sentence after "Paris." (known one token
later, when the space arrives); "\\n" ends one at the newline itself. The sentence is cut after the token that
holds that character, so a token such as ".\\n" stays whole with the sentence it ends. The end of the text ends
its last sentence. It is a rule, not a parser: "e.g. " and "Mr. " end sentences too, "3.5" does not.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

BOUNDARIES = (". ", "? ", "! ", "\n")


def check_boundaries(boundaries: Sequence[str]) -> tuple[str, ...]:
    boundaries = (boundaries,) if isinstance(boundaries, str) else tuple(boundaries)
    if not boundaries or any(not isinstance(b, str) or not b for b in boundaries):
        raise ValueError(f"sentence boundaries must be a non-empty list of non-empty strings, got {boundaries!r}")
    return boundaries


class SentenceEnds:
    """Push each token's text; ``ends`` holds the index of the last token of every finished sentence."""

    def __init__(self, boundaries: Sequence[str] = BOUNDARIES) -> None:
        self.boundaries = check_boundaries(boundaries)
        self.text = ""
        self.token_of_char: list[int] = []  # character index -> index of the token that made it visible
        self.tokens = 0
        self.ends: list[int] = []
        self.scanned = 0  # characters before this one start no boundary still unseen

    def push(self, piece: str) -> None:
        self.text += piece
        self.token_of_char += [self.tokens] * len(piece)
        self.tokens += 1
        unsure = None  # the first character that may still start a boundary: look again from it next time
        for p in range(self.scanned, len(self.text)):
            if any(self.text.startswith(b, p) for b in self.boundaries):
                self._end_at(self.token_of_char[p])
            elif unsure is None and any(len(b) > len(self.text) - p and b.startswith(self.text[p:])
                                        for b in self.boundaries):
                unsure = p
        self.scanned = len(self.text) if unsure is None else unsure

    def _end_at(self, token: int) -> None:
        i = bisect.bisect_left(self.ends, token)  # in order, once (a long boundary may complete after a short one)
        if i == len(self.ends) or self.ends[i] != token:
            self.ends.insert(i, token)

    def start_of(self, token: int) -> int:
        """The first token of the sentence that holds ``token`` (as far as the text seen so far tells)."""
        before = [e for e in self.ends if e < token]
        return before[-1] + 1 if before else 0

    def finished_before(self, token: int) -> int:
        """How many sentences end before ``token``."""
        return sum(e < token for e in self.ends)


def split_sentences(pieces: Sequence[str], boundaries: Sequence[str] = BOUNDARIES) -> list[str]:
    """The texts of the sentences of a token stream (``pieces[i]``: token i's text); they concatenate to it."""
    ends = SentenceEnds(boundaries)
    for piece in pieces:
        ends.push(piece)
    cuts = [0, *(e + 1 for e in ends.ends)]
    if cuts[-1] < len(pieces):
        cuts.append(len(pieces))
    return ["".join(pieces[a:b]) for a, b in zip(cuts, cuts[1:])]
