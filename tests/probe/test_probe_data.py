"""Annotation spans land on exactly the right tokens; prompt and padding are ignored; missing spans are counted."""

from __future__ import annotations

import pytest
import torch

from lucidlm.probe.data import IGNORE, LabelStats, collate, label_row
from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.tokenizer_training import CHATML

ANSWER = "Ada Vance was born in 1961 in Oslo and studied physics at Lund."
ROW = {"conversation": [{"role": "user", "content": "Tell me about Ada Vance."},
                        {"role": "assistant", "content": ANSWER}],
       "annotations": [{"span": "1961", "label": "Not Supported", "index": ANSWER.index("1961")},
                       {"span": "Oslo", "label": "Supported"},
                       {"span": "physics", "label": "Insufficient Information"}]}


def tokenizer(chat: bool):
    tok = byte_tokenizer(("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"))
    if chat:
        tok.config["chat_template"] = tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("chat", [True, False])
def test_labels_land_on_the_span_tokens(chat):
    tok = tokenizer(chat)
    short = {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes 7."}],
             "annotations": [{"span": "7", "label": "Not Supported"}]}
    long = {"conversation": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "ok"}],
            "annotations": []}
    examples = [label_row(r, tok) for r in (short, ROW, long)]
    batch = collate(examples, tok.pad_token_id)  # the row sits between a shorter and a longer one
    ids, labels, spans = batch["input_ids"][1], batch["labels"][1], batch["span_ids"][1]
    n = int(batch["attention_mask"][1].sum())
    assert tok.decode(ids[labels == 1].tolist()) == "1961"
    assert tok.decode(ids[(labels == IGNORE) & (batch["attention_mask"][1] == 1) & (spans >= 0)].tolist()) == "physics"
    assert (labels[n:] == IGNORE).all() and (spans[n:] == -1).all()  # padding
    response = tok.decode(ids[(labels != IGNORE) | (spans >= 0)].tolist())
    assert response.startswith(ANSWER)  # response tokens are labelled, the prompt is not
    assert tok.decode(ids[spans == 1].tolist()) == "Oslo" and batch["span_labels"][1].tolist() == [1, 0, IGNORE]
    assert tok.decode(batch["input_ids"][0][batch["labels"][0] == 1].tolist()) == "7"


def test_missing_spans_are_counted_and_bad_labels_refused():
    tok = tokenizer(True)
    stats = LabelStats()
    row = {**ROW, "annotations": ROW["annotations"] + [{"span": "born in 1999", "label": "Not Supported"}]}
    example = label_row(row, tok, stats)
    assert (stats.rows, stats.spans, stats.missing_spans, stats.missing) == (1, 4, 1, ["born in 1999"])
    assert len(example.span_labels) == 3
    with pytest.raises(ValueError, match="annotation label 'False'"):
        label_row({**ROW, "annotations": [{"span": "1961", "label": "False"}]}, tok)
    with pytest.raises(ValueError, match="must end with the assistant message"):
        label_row({"conversation": ROW["conversation"][:1], "annotations": []}, tok)


def test_index_is_used_when_the_span_occurs_twice():
    tok = tokenizer(True)
    text = "In 1961 it rained; Ada was born in 1961."
    row = {"conversation": [{"role": "user", "content": "?"}, {"role": "assistant", "content": text}],
           "annotations": [{"span": "1961", "label": "Not Supported", "index": text.rindex("1961")}]}
    ex = label_row(row, tok)
    positives = [i for i, y in enumerate(ex.labels) if y == 1]
    first_response = next(i for i, y in enumerate(ex.labels) if y != IGNORE)
    assert tok.decode(torch.tensor(ex.input_ids)[first_response:positives[0]].tolist()).endswith("born in ")


def test_a_conversation_longer_than_max_len_is_cut_and_counted():
    tok = tokenizer(True)
    stats = LabelStats()
    full = label_row(ROW, tok)
    cut_at = full.labels.index(1) + 4  # through the 4 byte tokens of the hallucinated "1961"
    cut = label_row(ROW, tok, stats, max_len=cut_at)  # "1961" kept, "Oslo" and "physics" beyond the cut
    assert cut.input_ids == full.input_ids[:cut_at] and cut.labels == full.labels[:cut_at]
    assert (stats.truncated, stats.truncated_spans) == (1, 2) and cut.span_labels == full.span_labels
    label_row(ROW, tok, stats, max_len=len(full.input_ids))
    assert stats.truncated == 1  # a conversation that fits is not counted


@pytest.mark.parametrize("annotations, message", [
    (["x"], r"annotations\[0\] must be an object with a string 'span'"),
    ([{"span": None, "label": "Supported"}], r"annotations\[0\] must be an object"),
    ([{"span": "1961"}], "annotation label None is not one of")])
def test_malformed_annotations_are_refused_by_field(annotations, message):
    with pytest.raises(ValueError, match=message):
        label_row({**ROW, "annotations": annotations}, tokenizer(True))
    with pytest.raises(ValueError, match=r"conversation\[1\] must be an object with string 'role' and 'content'"):
        label_row({**ROW, "conversation": [ROW["conversation"][0], "hi"]}, tokenizer(True))
