"""Sentence ends in a token stream (generate/sentences.py) against hand-made cases and a naive whole-text search."""

from __future__ import annotations

import random

import pytest

from lucidlm.generate.sentences import BOUNDARIES, SentenceEnds, split_sentences


def ends_of(pieces, boundaries=BOUNDARIES):
    ends = SentenceEnds(boundaries)
    for piece in pieces:
        ends.push(piece)
    return ends.ends


def naive_ends(pieces, boundaries):
    """Every complete occurrence of a boundary in the whole text, as the token holding its first character."""
    owner = [i for i, piece in enumerate(pieces) for _ in piece]
    text = "".join(pieces)
    return sorted({owner[p] for b in boundaries for p in range(len(text)) if text.startswith(b, p)})


def test_hand_made_cases():
    assert ends_of(["Paris", ".", " The", " end"]) == [1]  # the sentence keeps "." and not the space
    assert ends_of(["Paris", "."]) == []  # ". " not seen whole yet: the end of the text ends it (split_sentences)
    assert ends_of(["Pi", " is", " 3", ".", "14"]) == []
    assert ends_of(["a", ".\n", "b"]) == [1]  # one token holding both "." and "\n" ends once
    assert ends_of(["Why", "?", " ", "Ok", "!\n", "x"]) == [1, 4]
    assert ends_of(["x", "", ". y"]) == [2]  # a token that made no text visible owns no character


def test_split_sentences_concatenate_to_the_text():
    pieces = ["It", " is", " Paris", ".", " It", " is", " big", ".", " Yes"]
    assert split_sentences(pieces) == ["It is Paris.", " It is big.", " Yes"]
    assert split_sentences(["a", "\n"], ["\n"]) == ["a\n"]
    assert split_sentences([]) == []


@pytest.mark.parametrize("boundaries", [BOUNDARIES, ("ab", "b"), ("a.b", "."), ("xx",)])
def test_incremental_ends_equal_a_search_of_the_whole_text(boundaries):
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab. \nx?!") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 10))))
        cuts = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
        assert ends_of(pieces, boundaries) == naive_ends(pieces, boundaries), (pieces, boundaries)
        assert "".join(split_sentences(pieces, boundaries)) == text


def test_start_of_a_token():
    ends = SentenceEnds()
    for piece in ["A", ".", " B", ".", " C"]:
        ends.push(piece)
    assert [ends.start_of(i) for i in range(5)] == [0, 0, 2, 2, 4]
    assert [ends.finished_before(i) for i in range(5)] == [0, 0, 1, 1, 2]


def test_bad_boundaries_are_named():
    for bad in [(), ("",), (". ", 3)]:
        with pytest.raises(ValueError, match="sentence boundaries"):
            SentenceEnds(bad)
