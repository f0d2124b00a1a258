"""What the engine hands out, one event per generated token (or one error), for every client alike.

``lm.stream`` yields these, ``lm.generate`` collects them into ``Completion``s, and the server turns them into
server-sent events: one token-event type from the engine to every client.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    """One decoded token of one sequence."""

    token_id: int
    text: str  # the text this token makes visible ("" while a character or a stop string is pending)
    logprob: float  # log p(token) under the model's own distribution (before the sampling processors)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely tokens at this step
    # the probe's hallucination score, when a probe is loaded (None under the "own" alignment for a last token
    # that filled the context: it was never fed to the model, so it has no hidden state)
    score: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event


@dataclass
class ErrorEvent:
    """The sequence ended because of a failure of its own (its options, its logits, its text) or of the engine."""

    message: str


Event = TokenEvent | ErrorEvent


@dataclass
class Completion:
    """One generated sequence, whole."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    text: str | None = None
    score: float | None = None  # best-of-N / beam score when a strategy ranked it
    scores: list[float | None] | None = None  # per-token hallucination scores when a probe is loaded

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / max(len(self.logprobs), 1)

    @classmethod
    def from_events(cls, events: list[TokenEvent], with_text: bool, with_scores: bool) -> Completion:
        return cls([e.token_id for e in events], [e.logprob for e in events], events[-1].finish_reason,
                   text="".join(e.text for e in events) if with_text else None,
                   scores=[e.score for e in events] if with_scores else None)
