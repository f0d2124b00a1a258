"""From token ids to the text a person sees, one token at a time.

Two problems make this more than ``decode(ids)`` per token:
- a token can hold part of a character (byte-level BPE splits UTF-8), and some tokenizers change
  how a token reads depending on its left neighbour (SentencePiece's leading space). So each
  step decodes a short window ending at the new token and emits only the new, complete part;
- stop strings can span tokens: the text that could still become a stop string is held back
  until it either completes one (then the text ends before it) or cannot anymore. The streamed
  pieces therefore always concatenate to exactly the final text.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what decode yields for a partial UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already turned into text; they give context
        self.read = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (may be empty while a character is partial)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        after = decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (a dangling partial character decodes as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        after = decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class TextAssembler:
    """One sequence's visible text: detokenizes, finds stop strings, holds back possible starts."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = stop
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.shown = 0  # len of the prefix of text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly visible text. Sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return ""
        piece = self.detok.push(token_id)
        return self._add(piece)

    def finish(self) -> str:
        """The sequence ended: release what was held back."""
        out = "" if self.stopped else self._add(self.detok.flush())
        out += self.text[self.shown :]
        self.shown = len(self.text)
        return out

    def _add(self, piece: str) -> str:
        if not piece:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.finish()
        safe = len(self.text) - self._held()
        out = self.text[self.shown : safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = min(max((len(s) for s in self.stop), default=1) - 1, len(self.text))
        for k in range(longest, 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
