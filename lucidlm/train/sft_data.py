"""Supervised fine-tuning data: JSONL conversations → token ids with the loss on the responses only.

Rows are either ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles system, user, assistant, and
tool when the chat template names it) or an instruction pair ``{"prompt": ..., "response": ...}`` (also
``instruction``/``input``/``output``). With the tokenizer's chat template, an instruction pair becomes a
user turn and an assistant turn.

Which tokens are trained: every assistant turn, from where the template's generation prompt ends to
the end of that turn as rendered (its end-of-turn token included); everything else — system and user
turns, role headers — gets label −100. The turn boundaries are character positions found by rendering
the conversation prefix by prefix (the approach of TRL's assistant masks), mapped to tokens through
the tokenizer's offsets, so merges across a boundary cannot shift the mask. Without a chat template,
an instruction pair is ``prompt + response + EOS`` with the prompt masked.

``prefix_lm=True`` also returns ``prefix_mask``: True over the tokens before the first trained one,
which then attend to each other in both directions (the model's ``prefix_mask``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..jsonl import DataError, read_rows
from ..tokenizer import Tokenizer, pad_id
from .objectives import IGNORE_INDEX


# --- the fields of a row ---------------------------------------------------------------------
def text_field(row: dict, *names: str, required: bool = True) -> str | None:
    """The first of ``names`` present in the row, which must be a string."""
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise DataError(f"field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise DataError(f"missing field: one of {list(names)}")
    return None


ROLES = ("system", "user", "assistant")  # + "tool" where the chat template has a branch for it (chat_roles)


def chat_roles(chat_template: str | list | dict | None) -> tuple[str, ...]:
    """The roles a conversation may use with this template: system, user, assistant, and tool when the template
    names the role 'tool' (a template without such a branch would render a tool turn as if it were another)."""
    source = chat_template if isinstance(chat_template, str) else str(chat_template)  # named templates: all of them
    return ROLES + ("tool",) if "'tool'" in source or '"tool"' in source else ROLES


def messages_field(row: dict, name: str = "messages", roles: tuple[str, ...] = ROLES) -> list[dict]:
    messages = row.get(name)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field {name!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in roles:
            raise DataError(f"{name}[{i}].role {m['role'][:40]!r} is not one of {list(roles)}")
    return messages


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    prefix_len: int  # tokens before the first trained one


class ChatFormatter:
    def __init__(self, tokenizer: Tokenizer, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.roles = chat_roles(tokenizer.chat_template)  # an unknown role ("wizard") is a bad row, not a new turn
        self.truncated = 0  # examples cut to max_len

    def from_row(self, row: dict) -> Example:
        if "messages" in row:
            return self.conversation(messages_field(row, roles=self.roles))
        prompt = text_field(row, "prompt", "instruction")
        extra = text_field(row, "input", required=False)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        response = text_field(row, "response", "output", "completion")
        return self.pair(prompt, response)

    def pair(self, prompt: str | list[dict], response: str) -> Example:
        """A prompt (text, or the messages before the answer) and its response."""
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template is not None:
            return self.conversation(messages + [{"role": "assistant", "content": response}])
        if isinstance(prompt, list):
            raise DataError("conversation prompts need a chat template; the tokenizer has none")
        head = self.tokenizer.encode(prompt, add_special_tokens=True)
        tail = self.tokenizer.encode(response, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return self._cut(Example(head + tail, [IGNORE_INDEX] * len(head) + tail, len(head)))

    def conversation(self, messages: list[dict]) -> Example:
        if self.tokenizer.chat_template is None:
            raise DataError("'messages' rows need a chat template; the tokenizer has none")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("the conversation has no assistant turn to train on")
        render = self.tokenizer.apply_chat_template
        full = render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = render(messages[:i], add_generation_prompt=True) if i else ""
            through = render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(start)):
                raise DataError("the chat template does not render this conversation prefix by prefix, "
                                "so its assistant turns cannot be located")
            spans.append((len(start), len(through)))
        enc = self.tokenizer.backend.encode(full, add_special_tokens=False)
        # a token is the answer's when it overlaps an assistant span: after a template ending in "A: " the answer's
        # first token is " Gideon", starting on the template's space
        labels = [t if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
                  for t, (a, b) in zip(enc.ids, enc.offsets)]
        first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
        return self._cut(Example(list(enc.ids), labels, first))

    def _cut(self, ex: Example) -> Example:
        if len(ex.input_ids) <= self.max_len:
            return ex
        self.truncated += 1
        ex = Example(ex.input_ids[: self.max_len], ex.labels[: self.max_len], min(ex.prefix_len, self.max_len))
        if all(y == IGNORE_INDEX for y in ex.labels[1:]):
            raise DataError(f"the prompt alone fills max_len={self.max_len}: no response token is left to train on")
        return ex


def pad_batch(examples: list[Example], pad_id: int, prefix_lm: bool = False,
              multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded (batch, longest) tensors, longest rounded up to ``multiple`` (S2-Attn's whole groups); padding
    has attention_mask 0 and label −100."""
    longest = -(-max(len(e.input_ids) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    prefix = torch.zeros(ids.shape, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        prefix[i, : e.prefix_len] = True
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if prefix_lm:
        batch["prefix_mask"] = prefix
    return batch


class JsonlDataset(ABC):
    """Batches from JSONL files, row by row (nothing but one batch in memory); ``epochs=None`` repeats.
    The position (epoch, file, line) is the state_dict, so a resumed run reads on from the same row."""

    def __init__(self, files: list[str | Path], batch_size: int, epochs: int | None, skip_bad_lines: bool) -> None:
        self.files = [Path(f) for f in files]
        missing = [str(f) for f in self.files if not f.is_file()]
        if not self.files or missing:
            raise FileNotFoundError(f"JSONL files not found: {missing}" if missing else "no JSONL files given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.epochs, self.skip_bad_lines = batch_size, epochs, skip_bad_lines
        self.state = {"epoch": 0, "file": 0, "line": 0}
        self.skipped: list[str] = []  # messages of the lines skipped

    @abstractmethod
    def parse(self, row: dict):
        """What a row becomes (raises DataError on a bad row)."""

    @abstractmethod
    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """A batch of parsed rows."""

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.state
        while self.epochs is None or s["epoch"] < self.epochs:
            from_start = s["file"] == 0 and s["line"] == 0  # a resumed epoch may have nothing left to read
            produced = False
            items: list = []
            while s["file"] < len(self.files):
                for number, item in read_rows(self.files[s["file"]], s["line"], self.parse, self.skip_bad_lines,
                                              self.skipped.append):
                    items.append(item)
                    if len(items) == self.batch_size:
                        s["line"] = number  # the batch ends here: resume after this row
                        produced = True
                        yield self.collate(items)
                        items = []
                s["file"], s["line"] = s["file"] + 1, 0
            if items:
                produced = True
                yield self.collate(items)  # the epoch's last, smaller batch
            s["epoch"], s["file"], s["line"] = s["epoch"] + 1, 0, 0
            if not produced and from_start:
                raise ValueError(f"no usable rows in {[str(f) for f in self.files]}"
                                 + (f" ({len(self.skipped)} bad lines skipped)" if self.skipped else ""))


class SFTDataset(JsonlDataset):
    def __init__(self, files: list[str | Path], tokenizer: Tokenizer, max_len: int, batch_size: int,
                 epochs: int | None = None, prefix_lm: bool = False, skip_bad_lines: bool = False,
                 pad_multiple: int = 1) -> None:
        super().__init__(files, batch_size, epochs, skip_bad_lines)
        self.formatter = ChatFormatter(tokenizer, max_len)
        self.pad_id = pad_id(tokenizer)
        self.prefix_lm, self.pad_multiple = prefix_lm, pad_multiple

    @property
    def truncated(self) -> int:
        return self.formatter.truncated

    def parse(self, row: dict) -> Example:
        return self.formatter.from_row(row)

    def collate(self, items: list[Example]) -> dict[str, torch.Tensor]:
        return pad_batch(items, self.pad_id, self.prefix_lm, self.pad_multiple)


class PreferenceDataset(JsonlDataset):
    """``{"prompt": text or messages, "chosen": text, "rejected": text}`` → chosen_* and rejected_* tensors."""

    def __init__(self, files: list[str | Path], tokenizer: Tokenizer, max_len: int, batch_size: int,
                 epochs: int | None = None, skip_bad_lines: bool = False) -> None:
        super().__init__(files, batch_size, epochs, skip_bad_lines)
        self.formatter = ChatFormatter(tokenizer, max_len)
        self.pad_id = pad_id(tokenizer)

    def parse(self, row: dict) -> tuple[Example, Example]:
        if isinstance(row.get("prompt"), list):
            prompt = messages_field(row, "prompt", self.formatter.roles)
        else:
            prompt = text_field(row, "prompt")
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
        return self.formatter.pair(prompt, chosen), self.formatter.pair(prompt, rejected)

    def collate(self, items: list[tuple[Example, Example]]) -> dict[str, torch.Tensor]:
        out = {}
        for side, examples in (("chosen", [c for c, _ in items]), ("rejected", [r for _, r in items])):
            out |= {f"{side}_{k}": v for k, v in pad_batch(examples, self.pad_id).items()}
        return out
