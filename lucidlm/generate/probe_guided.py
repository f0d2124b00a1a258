"""Probe-guided decoding: acting on the hallucination probe's live scores while the model writes.

Decoding runs plainly (the request as given) until a token's probe score passes the threshold (score >
``threshold``); then, by ``mode``:

- "abstain": stop. The answer becomes ``abstention`` (``abstain_scope="answer"``), or keeps the sentences it
  finished before the flagged one and ends with the abstention (``"rest"``).
- "resample": back up to the start of the flagged token's sentence and sample that sentence ``k`` times — one
  request of k choices whose prompt is the original prompt + the tokens accepted so far (they share one prefill;
  the prefix cache reuses prompt heads earlier requests prefilled) — each attempt cut at its first sentence end.
  The attempt whose riskiest token is least risky (lowest max score: probe/selective.py's best-of-N rule, per
  sentence) is kept, and plain decoding goes on from prompt + accepted tokens. If even the kept attempt passes
  the threshold, ``on_all_flagged`` says: "abstain", or "keep_best" and go on. At most ``max_sentences``
  sentences of an answer are resampled; a flag past that is handled like a sentence whose attempts all passed
  (abstain, or keep the sentence as written).

Sentences end by generate/sentences.py's rule (". ", "? ", "! ", "\\n" by default). Seeds: the r-th resampled
sentence of an answer (r from 0) draws attempt i with ``seed + r(k+1) + i``, and the plain decoding after it
continues with ``seed + r(k+1) + k`` when the request samples (a greedy one needs none). So attempt i is exactly
``lm.generate(prompt + accepted, seed=seed + r(k+1) + i, ...)`` cut at its first sentence end, and with a
threshold never passed the answer is exactly ``lm.generate(prompt, ...)``. Attempts sample with the request's
options, at ``temperature`` when given (k attempts of a greedy request would be one sentence k times).

It lives in generate/ because it needs the probe only through the scores the engine puts on its events (like
strategies.py's best-of-N), never probe/ itself; and it drives the engine — one ``Engine`` for every prompt of a
call, each pass and attempt a request whose stream is cancelled once it has said enough — not a loop of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .engine import Engine, check_prompts
from .events import ErrorEvent, Event, TokenEvent
from .generation_config import GenerationConfig
from .offline import GenerationError, Generator
from .sentences import BOUNDARIES, SentenceEnds, check_boundaries, split_sentences
from .sequence import Sequence

PREFIX_CACHE_BYTES = 64 << 20  # prompt heads kept for the resample requests that repeat them


@dataclass(frozen=True)
class GuidedConfig:
    threshold: float = 0.5  # a token is flagged when its probe score is above this
    mode: str = "abstain"  # "abstain" | "resample"
    k: int = 3  # attempts per resampled sentence
    max_sentences: int = 4  # sentences of one answer that may be resampled
    abstention: str = "I don't know."
    abstain_scope: str = "answer"  # "answer": the whole answer is replaced; "rest": finished sentences stay
    on_all_flagged: str = "abstain"  # "abstain" | "keep_best": when every attempt of a sentence is flagged
    boundaries: tuple[str, ...] = BOUNDARIES
    seed: int = 0  # of the attempts and of the decoding after them
    temperature: float | None = None  # the attempts' temperature (None: the request's own)

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
            raise ValueError(f"threshold must be a number in [0, 1] (probe scores are probabilities), got {t!r}")
        for name, value, allowed in (("mode", self.mode, ("abstain", "resample")),
                                     ("abstain_scope", self.abstain_scope, ("answer", "rest")),
                                     ("on_all_flagged", self.on_all_flagged, ("abstain", "keep_best"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value, minimum in (("k", self.k, 1), ("max_sentences", self.max_sentences, 0),
                                     ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.abstention, str):
            raise ValueError(f"abstention must be a string, got {self.abstention!r}")
        object.__setattr__(self, "boundaries", check_boundaries(self.boundaries))
        temp = self.temperature
        if temp is not None and (isinstance(temp, bool) or not isinstance(temp, int | float)
                                 or not math.isfinite(temp) or temp < 0):
            raise ValueError(f"temperature must be a finite number >= 0 or None, got {temp!r}")

    def attempt_seed(self, round_: int, attempt: int) -> int:
        """The seed of attempt ``attempt`` of the ``round_``-th resampled sentence (attempt k: the decoding after)."""
        return self.seed + round_ * (self.k + 1) + attempt


@dataclass
class Token:
    id: int
    text: str
    score: float | None


def max_score(tokens: Seq[Token]) -> float:
    """The riskiest token's score (inf when none has one: nothing says it is safe)."""
    scores = [t.score for t in tokens if t.score is not None]
    return max(scores) if scores else math.inf


@dataclass
class Attempt:
    """One sampled version of a sentence."""

    seed: int
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" / "length": the answer ended inside this sentence

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def max_score(self) -> float:
        return max_score(self.tokens)


@dataclass
class GuidedEvent:
    """What the guide did. ``token`` indexes the answer's kept tokens: "flagged", the token that passed the
    threshold (as generated); "resampled", the first token of the sentence; "abstained", where the abstention
    begins."""

    kind: str  # "flagged" | "resampled" | "abstained"
    token: int
    sentence: int  # the answer's sentence (0-based)
    score: float | None = None  # flagged: the token's score; resampled: the kept attempt's max score
    attempts: list[Attempt] = field(default_factory=list)  # resampled: all k, in seed order
    kept: int | None = None  # resampled: which attempt was kept


@dataclass
class GuidedResult:
    text: str
    token_ids: list[int]  # the kept tokens (an abstention is text, not tokens)
    scores: list[float | None]  # the kept tokens' probe scores
    finish_reason: str  # "stop" | "length" | "abstain"
    events: list[GuidedEvent]
    sentences: list[str]  # the kept tokens' sentences: their concatenation is the text unless it abstained

    @property
    def abstained(self) -> bool:
        return self.finish_reason == "abstain"


Submit = Callable[[list[int], GenerationConfig, list[Callable[[Sequence, TokenEvent], None]]], list[Sequence]]


class _Answer:
    """One prompt's guided decoding: a state machine fed the events of its current request(s)."""

    def __init__(self, prompt: list[int], config: GenerationConfig, guided: GuidedConfig, submit: Submit) -> None:
        self.prompt, self.config, self.guided, self.submit = prompt, config, guided, submit
        self.kept: list[Token] = []
        self.sentences = 0  # finished sentences among the kept tokens
        self.events: list[GuidedEvent] = []
        self.rounds = 0  # sentences resampled
        self.result: GuidedResult | None = None
        self._pass(config)

    # --- plain decoding ---------------------------------------------------------------------------------
    def _pass(self, config: GenerationConfig) -> None:
        remaining = self.config.max_new_tokens - len(self.kept)
        if remaining <= 0:
            return self._finish("length")
        self.written: list[Token] = []
        self.ends = SentenceEnds(self.guided.boundaries)
        self.let_through = -1  # the start of a flagged sentence kept as written (past the resample budget)
        self.submit(self._prompt(), config.replace(max_new_tokens=remaining), [self._on_pass])

    def _on_pass(self, seq: Sequence, event: TokenEvent) -> None:
        i = len(self.written)
        self.written.append(Token(event.token_id, event.text, event.score))
        self.ends.push(event.text)
        start = self.ends.start_of(i)
        if _flags(event.score, self.guided.threshold) and start != self.let_through:
            sentence = self.sentences + self.ends.finished_before(start)
            self.events.append(GuidedEvent("flagged", len(self.kept) + i, sentence, event.score))
            if self.guided.mode == "resample" and self.rounds < self.guided.max_sentences:
                seq.cancel()
                self._accept(self.written[:start], sentence - self.sentences)
                return self._attempts()
            if self.guided.mode == "abstain" or self.guided.on_all_flagged == "abstain":
                seq.cancel()
                return self._abstain(self.written[:start], sentence - self.sentences)
            self.let_through = start
        if event.finish_reason is not None:
            self._accept(self.written, 0)
            self._finish(event.finish_reason)

    # --- resampling a sentence --------------------------------------------------------------------------
    def _attempts(self) -> None:
        remaining = self.config.max_new_tokens - len(self.kept)
        if remaining <= 0:
            return self._finish("length")
        g = self.guided
        sampling = dataclasses.replace(attempt_sampling(self.config, g), seed=g.attempt_seed(self.rounds, 0))
        self.tries = [Attempt(g.attempt_seed(self.rounds, i)) for i in range(g.k)]
        self.try_ends = [SentenceEnds(g.boundaries) for _ in range(g.k)]
        self.pending = g.k
        handlers = [lambda seq, event, i=i: self._on_attempt(i, seq, event) for i in range(g.k)]
        self.submit(self._prompt(), self.config.replace(max_new_tokens=remaining, sampling=sampling), handlers)

    def _on_attempt(self, i: int, seq: Sequence, event: TokenEvent) -> None:
        attempt, ends = self.tries[i], self.try_ends[i]
        attempt.tokens.append(Token(event.token_id, event.text, event.score))
        ends.push(event.text)
        if ends.ends:  # the sentence is over; a token after its end (the boundary's lookahead) is not part of it
            del attempt.tokens[ends.ends[0] + 1:]
            if len(attempt.tokens) == ends.tokens:
                attempt.finish_reason = event.finish_reason
            if event.finish_reason is None:
                seq.cancel()
        elif event.finish_reason is not None:
            attempt.finish_reason = event.finish_reason
        else:
            return
        self.pending -= 1
        if self.pending == 0:
            self._choose()

    def _choose(self) -> None:
        g = self.guided
        kept = min(range(g.k), key=lambda i: (self.tries[i].max_score, i))  # the first one on ties
        best = self.tries[kept]
        self.events.append(GuidedEvent("resampled", len(self.kept), self.sentences, best.max_score,
                                       self.tries, kept))
        self.rounds += 1
        if _flags(best.max_score, g.threshold) and g.on_all_flagged == "abstain":
            return self._abstain([], 0)
        self._accept(best.tokens, 1)
        if best.finish_reason is not None:
            return self._finish(best.finish_reason)
        config = self.config
        if not config.sampling.greedy:
            config = config.replace(sampling=dataclasses.replace(config.sampling,
                                                                 seed=g.attempt_seed(self.rounds - 1, g.k)))
        self._pass(config)

    # --- endings ----------------------------------------------------------------------------------------
    def _prompt(self) -> list[int]:
        return self.prompt + [t.id for t in self.kept]

    def _accept(self, tokens: list[Token], sentences: int) -> None:
        self.kept += tokens
        self.sentences += sentences

    def _abstain(self, finished: list[Token], sentences: int) -> None:
        if self.guided.abstain_scope == "answer":
            self.kept, self.sentences = [], 0
        else:
            self._accept(finished, sentences)
        self.events.append(GuidedEvent("abstained", len(self.kept), self.sentences))
        said = "".join(t.text for t in self.kept)
        gap = " " if said and not said[-1].isspace() and self.guided.abstention else ""
        self._finish("abstain", said + gap + self.guided.abstention)

    def _finish(self, reason: str, text: str | None = None) -> None:
        pieces = [t.text for t in self.kept]
        self.result = GuidedResult("".join(pieces) if text is None else text, [t.id for t in self.kept],
                                   [t.score for t in self.kept], reason, self.events,
                                   split_sentences(pieces, self.guided.boundaries))


def _flags(score: float | None, threshold: float) -> bool:
    return score is not None and score > threshold


def attempt_sampling(config: GenerationConfig, guided: GuidedConfig):
    """The attempts' sampling options: the request's, at the guide's temperature when it sets one."""
    if guided.temperature is None:
        return config.sampling
    return dataclasses.replace(config.sampling, temperature=float(guided.temperature))


def check_request(gen: Generator, config: GenerationConfig, guided: GuidedConfig) -> None:
    """Raise ValueError, naming the problem, before any work."""
    if gen.probe is None:
        raise ValueError("probe-guided decoding needs a probe: load the model with one (lucidlm.load(..., probe=DIR))")
    if gen.tokenizer is None:
        raise ValueError("probe-guided decoding needs a tokenizer: sentences are found in the text")
    if config.num_beams > 1:
        raise ValueError("probe-guided decoding streams tokens; beam search (num_beams > 1) does not")
    if guided.mode == "resample" and guided.k > 1 and attempt_sampling(config, guided).greedy:
        raise ValueError(f"resampling with k={guided.k} attempts needs sampling: greedy attempts would be one "
                         "sentence k times (give the request a temperature, or GuidedConfig.temperature)")


def guided_generate(gen: Generator, prompts: Seq[Seq[int]], config: GenerationConfig, guided: GuidedConfig,
                    rows: int = 32) -> list[GuidedResult]:
    """One ``GuidedResult`` per prompt; up to ``rows`` sequences decode together on one engine."""
    check_request(gen, config, guided)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    prompts = check_prompts(prompts, gen.model.config.vocab_size, gen.model.config.max_seq_len)
    engine = gen.call_engine(max(rows, guided.k), max(len(p) for p in prompts) + config.max_new_tokens,
                             prefix_cache_bytes=PREFIX_CACHE_BYTES)
    inbox: deque[tuple[Sequence, Callable, Event]] = deque()
    answers = [_Answer(p, config, guided, _submitter(engine, inbox)) for p in prompts]
    while engine.has_work():
        engine.step()
        while inbox:
            seq, handler, event = inbox.popleft()
            if seq.cancelled:  # said enough already: the engine drops it before its next step
                continue
            if isinstance(event, ErrorEvent):
                raise GenerationError(event.message)
            handler(seq, event)
    missing = [i for i, a in enumerate(answers) if a.result is None]
    if missing:
        raise GenerationError(f"prompts {missing[:5]} got no answer: the engine ran out of work before they ended")
    return [a.result for a in answers]


def _submitter(engine: Engine, inbox: deque) -> Submit:
    """Queue one request (a group of choices sharing a prompt, choice i drawing with seed + i); each choice's events
    go to its handler through ``inbox``."""
    def submit(prompt, config, handlers):
        seqs = [Sequence(prompt, config, _unset, sample_index=i) for i in range(len(handlers))]
        for seq, handler in zip(seqs, handlers):
            seq.sink = lambda event, seq=seq, handler=handler: inbox.append((seq, handler, event))
        engine.add([seqs], fit_budget=False)
        return seqs

    return submit


def _unset(event: Event) -> None:
    raise RuntimeError("a sequence's sink was not set")
