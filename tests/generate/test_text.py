"""Incremental detokenization and stop strings: the pieces always add up to the final text."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from lucidlm.generate.text import IncrementalDetokenizer, TextAssembler
from lucidlm.tokenizer import Tokenizer, byte_tokenizer

TEXT = "héllo 😀 wörld, 東京!"


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_multibyte_characters_are_emitted_only_when_complete():
    tok = byte_tokenizer()
    ids = byte_ids(tok, TEXT)
    assert len(ids) == len(TEXT.encode())  # one token per byte: emoji and CJK span several tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == TEXT
    assert all("\ufffd" not in p for p in pieces)
    start = len("héllo ".encode())  # the emoji's 4 bytes follow: nothing until the last one
    assert pieces[start : start + 4] == ["", "", "", "😀"]


def test_sentencepiece_leading_spaces_depend_on_the_left_neighbour():
    vocab = {"▁hello": 0, "▁world": 1, "!": 2, "<unk>": 3}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend)
    assert tok.decode([1]) == "world"  # alone, the leading space is dropped...
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in [0, 1, 2]] == ["hello", " world", "!"]  # ...in context it is kept


def test_skip_special_tokens():
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in byte_ids(tok, "ab") + [eos]) == "ab"


def feed(tok: Tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], TextAssembler]:
    assembler = TextAssembler(tok, stop)
    pieces = []
    for i in byte_ids(tok, text):
        pieces.append(assembler.push(i))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return pieces, assembler


@pytest.mark.parametrize("text,stop,expected", [
    ("The answer is 42.\nQuestion: next", ("\nQuestion:",), "The answer is 42."),
    ("abcabd", ("abd",), "abc"),  # a false start ("ab" then "c") is released, the real one cuts
    ("no stop here", ("zzz",), "no stop here"),
    ("a😀b", ("😀",), "a"),  # a stop string made of a multi-token character
    ("xyEND and ENDING", ("ING", "END"), "xy"),  # the earliest of several stop strings wins
])
def test_stop_strings_cut_the_text_and_pieces_add_up(text, stop, expected):
    tok = byte_tokenizer()
    pieces, assembler = feed(tok, text, stop)
    assert assembler.text == expected
    assert "".join(pieces) == expected
    assert assembler.stopped == (expected != text)


def test_text_that_may_start_a_stop_string_is_held_back():
    tok = byte_tokenizer()
    assembler = TextAssembler(tok, ("STOP",))
    shown = "".join(assembler.push(i) for i in byte_ids(tok, "go ST"))
    assert shown == "go "  # "ST" might become "STOP"
    assert assembler.push(byte_ids(tok, "X")[0]) == "STX"  # it did not: released
