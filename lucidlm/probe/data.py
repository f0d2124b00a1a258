"""Probe training data: annotated conversations → per-token labels and span ids.

Rows follow the long-form annotation datasets of Obeso et al. (2025):

    {"conversation": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "annotations": [{"span": "born in 1961", "label": "Not Supported", "index": 42}, ...]}

Spans live in the last assistant message; ``index`` is the span's character offset there (when
missing, the first occurrence is searched). Labels: "Not Supported" → 1 (hallucinated), "Supported"
→ 0, "Insufficient Information" → ignored. Response tokens outside every span are negatives (0);
prompt tokens, role headers and padding are ignored (−100). Spans map to tokens through the
tokenizer's character offsets: a token belongs to a span when their characters overlap. A span that
is not in the text is counted (``missing_spans``) and reported, never silently dropped. With ``max_len``
(the model's context) a longer conversation is cut to its first ``max_len`` tokens — exact for a causal
model, whose states there do not depend on what follows — and counted (``truncated``, plus the spans left
with no token, ``truncated_spans``), never fed whole (a 200k-token attention mask is 40 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tokenizer import Tokenizer

IGNORE = -100
LABELS = {"Not Supported": 1, "Supported": 0, "Insufficient Information": IGNORE}


@dataclass
class LabeledExample:
    input_ids: list[int]
    labels: list[int]  # 1 hallucinated, 0 supported / outside spans, −100 ignored
    span_ids: list[int]  # index of the annotation a token belongs to, −1 outside spans
    span_labels: list[int]  # per annotation: 1, 0 or −100


@dataclass
class LabelStats:
    rows: int = 0
    spans: int = 0
    missing_spans: int = 0
    missing: list[str] = field(default_factory=list)  # first few, for the report
    truncated: int = 0  # conversations cut to max_len tokens
    truncated_spans: int = 0  # spans that lay wholly beyond the cut


def check_row(row: dict) -> tuple[list[dict], list[dict]]:
    """(conversation, annotations) of a row, their shapes checked (an error names the field at fault)."""
    conversation, annotations = row.get("conversation"), row.get("annotations", [])
    if not isinstance(conversation, list) or not isinstance(annotations, list):
        raise ValueError("a row needs 'conversation' (a list of messages) and 'annotations' (a list)")
    for i, m in enumerate(conversation):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"conversation[{i}] must be an object with string 'role' and 'content'")
    for i, a in enumerate(annotations):
        if not (isinstance(a, dict) and isinstance(a.get("span"), str)):
            raise ValueError(f"annotations[{i}] must be an object with a string 'span', got {str(a)[:60]}")
        if a.get("label") not in LABELS:
            raise ValueError(f"annotation label {a.get('label')!r} is not one of {list(LABELS)}")
    return conversation, annotations


def render(tokenizer: Tokenizer, conversation: list[dict]) -> tuple[str, int]:
    """(full text, character offset where the last assistant message's content starts)."""
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("the conversation must end with the assistant message the annotations refer to")
    content = conversation[-1]["content"]
    if tokenizer.chat_template is None:  # plain: turns joined by blank lines
        head = "".join(m["content"] + "\n\n" for m in conversation[:-1])
        return head + content, len(head)
    head = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, add_generation_prompt=False)
    if not full.startswith(head + content):
        raise ValueError("the chat template does not place the assistant content right after the generation prompt")
    return full, len(head)


def span_ranges(content: str, annotations: list[dict], start: int = 0,
                stats: LabelStats | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """(character ranges shifted by ``start``, labels) of the annotations found in ``content``: at their ``index``
    when the span is there, else its first occurrence; a span not in ``content`` is counted in ``stats`` and left
    out (so a range's position is not its annotation's index once one is missing)."""
    stats = stats if stats is not None else LabelStats()
    spans: list[tuple[int, int]] = []
    span_labels: list[int] = []
    for a in annotations:
        at = a.get("index")
        if not (isinstance(at, int) and content[at:at + len(a["span"])] == a["span"]):
            at = content.find(a["span"])
        stats.spans += 1
        if not a["span"] or at < 0:
            stats.missing_spans += 1
            if len(stats.missing) < 5:
                stats.missing.append(a["span"][:60])
            continue
        spans.append((start + at, start + at + len(a["span"])))
        span_labels.append(LABELS[a["label"]])
    return spans, span_labels


def token_labels(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], span_labels: list[int],
                 start: int) -> tuple[list[int], list[int]]:
    """(labels, span ids) of tokens whose characters are ``offsets``: a token belongs to the first span its
    characters overlap (positive if any span it overlaps is); outside every span, 0 from character ``start`` on
    (the response) and ignored before it."""
    labels, span_ids = [], []
    for a, b in offsets:
        inside = [i for i, (s, e) in enumerate(spans) if a < e and s < b]  # character overlap
        if inside:
            span_ids.append(inside[0])
            labels.append(max(span_labels[i] for i in inside))  # a token in a hallucinated span is positive
        else:
            span_ids.append(-1)
            labels.append(0 if a >= start else IGNORE)
    return labels, span_ids


def label_row(row: dict, tokenizer: Tokenizer, stats: LabelStats | None = None,
              max_len: int | None = None) -> LabeledExample:
    """max_len: keep the first max_len tokens (the model's context), counted in ``stats``."""
    stats = stats if stats is not None else LabelStats()
    conversation, annotations = check_row(row)
    full, start = render(tokenizer, conversation)
    spans, span_labels = span_ranges(conversation[-1]["content"], annotations, start, stats)
    stats.rows += 1
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if max_len is not None and len(ids) > max_len:
        ids, offsets = ids[:max_len], offsets[:max_len]
        end = offsets[-1][1] if offsets else 0
        stats.truncated += 1
        stats.truncated_spans += sum(s >= end for s, _ in spans)
    labels, span_ids = token_labels(offsets, spans, span_labels, start)
    return LabeledExample(ids, labels, span_ids, span_labels)


def collate(examples: list[LabeledExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (−100 on padding), span_ids (−1 on padding)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    spans = torch.full_like(ids, -1)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], spans[i, :n], mask[i, :n] = (torch.tensor(e.input_ids), torch.tensor(e.labels),
                                                                  torch.tensor(e.span_ids), 1)
    span_labels = torch.full((len(examples), max(1, max(len(e.span_labels) for e in examples))), IGNORE)
    for i, e in enumerate(examples):
        span_labels[i, : len(e.span_labels)] = torch.tensor(e.span_labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "span_ids": spans, "span_labels": span_labels}
