"""OpenAI response bodies and stream chunks, built from the batcher's token events.

Chat (``chat.completion`` / ``chat.completion.chunk``) and legacy completions (``text_completion``)
differ in where text and log-probabilities go; both carry, per choice, lucidlm's extension
``token_scores``: ``[{"token": str, "score": float}]``, each generated token's hallucination score from
the probe (present only when the server runs with ``--probe``). In a stream every token travels in its
own chunk, so each chunk's ``token_scores`` holds the one token whose text is that chunk's content
(a stop string being decided can hold text back: then the content arrives with a later token).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer
from .batcher import TokenEvent


@dataclass
class ChoiceState:
    """Everything one choice produced so far (non-streamed responses are built from it)."""

    text: str = ""
    events: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None


class TokenTexts:
    """Each token id's own text, for logprobs and scores (decoded alone, cached)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            self.cache[token_id] = text
        return text


class ResponseBuilder:
    """The fixed parts of one response (id, created, model) and the per-choice pieces."""

    def __init__(self, chat: bool, model: str, texts: TokenTexts, logprobs: bool, top_logprobs: int,
                 probe: bool) -> None:
        self.chat, self.model, self.texts = chat, model, texts
        self.logprobs, self.top_logprobs, self.probe = logprobs, top_logprobs, probe
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    # --- pieces -------------------------------------------------------------------------------------
    def _chat_logprobs(self, events: list[TokenEvent]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            token = self.texts(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        content = [entry(e.token_id, e.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                   for e in events]
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, events: list[TokenEvent], offset: int) -> dict:
        tokens = [self.texts(e.token_id) for e in events]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [{self.texts(t): lp for t, lp in e.top_logprobs} for e in events] if self.top_logprobs else None
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events], "top_logprobs": top,
                "text_offset": offsets}

    def _extras(self, events: list[TokenEvent], text_offset: int = 0) -> dict:
        out: dict = {}
        if self.logprobs:
            out["logprobs"] = (self._chat_logprobs(events) if self.chat
                               else self._completion_logprobs(events, text_offset))
        else:
            out["logprobs"] = None
        if self.probe:
            out["token_scores"] = [{"token": self.texts(e.token_id), "score": e.score} for e in events]
        return out

    # --- whole responses ---------------------------------------------------------------------------------
    def response(self, choices: list[ChoiceState], prompt_tokens: int, prefixes: list[str],
                 generated: list[ChoiceState] | None = None) -> dict:
        """The whole body; ``generated`` (best_of: every sample, of which ``choices`` are the best) counts
        toward usage."""
        body_choices = []
        for index, (c, prefix) in enumerate(zip(choices, prefixes)):
            events = [e for e in c.events if e.token_id >= 0]
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": c.text, "refusal": None}}
            else:
                choice = {"index": index, "text": prefix + c.text}
            body_choices.append(choice | self._extras(events, len(prefix)) | {"finish_reason": c.finish_reason})
        return self._envelope("chat.completion" if self.chat else "text_completion") | {
            "choices": body_choices, "usage": usage(prompt_tokens, generated or choices)}

    # --- stream chunks ---------------------------------------------------------------------------------
    def role_chunk(self, index: int) -> dict:
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def text_chunk(self, index: int, text: str) -> dict:
        """A completion stream's echoed prompt."""
        return self._chunk({"index": index, "text": text, "logprobs": None, "finish_reason": None})

    def token_chunk(self, index: int, event: TokenEvent, text_offset: int) -> dict:
        if self.chat:
            choice = {"index": index, "delta": {"content": event.text}}
        else:
            choice = {"index": index, "text": event.text}
        return self._chunk(choice | self._extras([event], text_offset) | {"finish_reason": None})

    def finish_chunk(self, index: int, reason: str) -> dict:
        choice = {"index": index, "delta": {}} if self.chat else {"index": index, "text": ""}
        return self._chunk(choice | {"logprobs": None, "finish_reason": reason})

    def usage_chunk(self, prompt_tokens: int, choices: list[ChoiceState]) -> dict:
        return self._chunk(None) | {"usage": usage(prompt_tokens, choices)}

    def _chunk(self, choice: dict | None) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [] if choice is None else [choice]}

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}


SYSTEM_FINGERPRINT = "lucidlm-0.1"


def usage(prompt_tokens: int, choices: list[ChoiceState]) -> dict:
    completion = sum(sum(1 for e in c.events if e.token_id >= 0) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
