"""Packing: the stream is every document's tokens + EOS, in order, cut into blocks; resume is exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.pretrain_data import PackedTextDataset

DOCS = [f"document number {i}: " + "word " * (i % 7) for i in range(40)]


@pytest.fixture
def files(tmp_path):
    paths = []
    for f in range(3):
        path = tmp_path / f"part{f}.txt"
        path.write_text("\n\n".join(DOCS[f::3]) + "\n")
        paths.append(path)
    return paths


def stream(tok, docs):
    return [t for d in docs for t in tok.encode(d.strip(), add_special_tokens=False) + [tok.eos_token_id]]


def test_blocks_are_the_document_stream_with_eos(files):
    tok = byte_tokenizer()
    data = PackedTextDataset(files, tok, block_size=16, batch_size=2, epochs=1)
    batches = list(data)
    flat = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    expected = stream(tok, DOCS[0::3] + DOCS[1::3] + DOCS[2::3])
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 32  # only the last partial batch is left
    assert all(torch.equal(b["labels"], b["input_ids"]) and b["input_ids"].shape == (2, 16) for b in batches)


def test_resume_continues_exactly(files):
    tok = byte_tokenizer()
    straight = list(itertools.islice(PackedTextDataset(files, tok, 16, 2), 40))  # > 1 epoch
    first = PackedTextDataset(files, tok, 16, 2)
    head = list(itertools.islice(iter(first), 13))
    state = first.state_dict()
    second = PackedTextDataset(files, tok, 16, 2)
    second.load_state_dict(state)
    tail = list(itertools.islice(iter(second), 27))
    for a, b in zip(straight, head + tail, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_train_and_val_splits_partition_the_documents(files):
    tok = byte_tokenizer()
    def tokens(split):
        return torch.cat([b["input_ids"].flatten() for b in
                          PackedTextDataset(files, tok, 4, 1, epochs=1, split=split, val_percent=30)]).tolist()
    train, val = tokens("train"), tokens("val")
    assert 0 < len(val) < len(train)
    eos = tok.eos_token_id
    docs = lambda ids: {tok.decode(d) for d in _split(ids, eos)[1:] if d}  # noqa: E731  (the first may be cut)
    assert docs(train).isdisjoint(docs(val))


def _split(ids, sep):
    out, cur = [], []
    for t in ids:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def test_bad_input(files, tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PackedTextDataset([tmp_path / "missing.txt"], tok, 16, 2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(iter(PackedTextDataset(files[:1], tok, block_size=4096, batch_size=8)))
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        PackedTextDataset(files, tok, 1, 2)
    other = PackedTextDataset(files[:2], tok, 16, 2)
    with pytest.raises(ValueError, match="other files"):
        other.load_state_dict(PackedTextDataset(files, tok, 16, 2).state_dict())
