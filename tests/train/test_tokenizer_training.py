"""Byte-level BPE training: round-trips any text and is read identically by transformers' AutoTokenizer."""

from __future__ import annotations

import pytest
import transformers

from lucidlm.tokenizer import Tokenizer
from lucidlm.train.corpus import write_corpus
from lucidlm.train.tokenizer_training import train_bpe_tokenizer

TEXTS = ["Anna Berg is a baker who lives near the harbour.", "naïve café — 日本語 🙂\n\n  spaced   out", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "corpus", documents=400, files=2)
    train_bpe_tokenizer([root / "corpus"], vocab_size=400, out_dir=root / "out")
    return root / "out"


def test_round_trip_and_merges(trained):
    tok = Tokenizer.from_dir(trained)
    assert 300 < tok.vocab_size <= 400
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode()) / 2  # merges learned from the corpus
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)


def test_transformers_reads_it_the_same(trained):
    ours, theirs = Tokenizer.from_dir(trained), transformers.AutoTokenizer.from_pretrained(trained)
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who bakes?"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)
    assert theirs.eos_token == "<|eos|>" and theirs.pad_token_id == ours.pad_token_id


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_bpe_tokenizer([tmp_path / "nope.txt"], 400)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        train_bpe_tokenizer([tmp_path / "empty.txt"], 400)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="below the byte alphabet"):
        train_bpe_tokenizer([tmp_path / "a.txt"], 100)
