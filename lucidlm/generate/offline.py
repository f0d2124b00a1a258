"""The library's use of the engine: one call drives it synchronously to the end (vLLM's offline ``LLM`` and its
server share one engine the same way; the server drives it from a thread, serve/batcher.py).

``Generator`` is what the engine needs from a loaded model, as plain values — the model, its tokenizer, EOS ids,
an optional probe — so that ``generate/`` never sees the ``LM`` object built above it (api.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from ..model.transformer import Transformer
from ..progress import progress_bar
from ..tokenizer import Tokenizer, pad_id
from .compiled_steps import as_mode
from .engine import STATIC_LEN_STEP, Engine, ProbeScoring, check_prompts
from .events import Completion, ErrorEvent, Event, TokenEvent
from .generation_config import GenerationConfig
from .sequence import Sequence


class GenerationError(RuntimeError):
    """A sequence could not be generated (the engine's message says why)."""


@dataclass(frozen=True)
class Generator:
    model: Transformer
    tokenizer: Tokenizer | None = None
    eos_token_ids: tuple[int, ...] = ()
    probe: ProbeScoring | None = None
    compile: bool | str = "off"  # decode steps as one compiled graph: "on" or "off" (compiled_steps.py)
    prefill_chunk: int = 512

    def engine(self, rows: int, max_len: int, **options) -> Engine:
        """An engine over this model for ``rows`` sequences of up to ``max_len`` tokens each (``options``: the
        server's prefix cache and failure isolation)."""
        return Engine(self.model, max_batch=rows, max_len=max_len, eos_token_ids=self.eos_token_ids,
                      pad_token_id=pad_id(self.tokenizer), tokenizer=self.tokenizer, probe=self.probe,
                      prefill_chunk=self.prefill_chunk, compile=self.compile, **options)

    def call_engine(self, rows: int, tokens: int, **options) -> Engine:
        """The engine of one library call: ``tokens`` (prompt + new) per row; a compiled one rounds the cache up to a
        multiple of STATIC_LEN_STEP so that calls of similar lengths share compiled shapes; failures raise
        (``options``: e.g. a prefix cache, for a call that sends requests sharing heads: probe_guided.py)."""
        if as_mode(self.compile) != "off":
            tokens = -(-tokens // STATIC_LEN_STEP) * STATIC_LEN_STEP
        return self.engine(rows, min(self.model.config.max_seq_len, tokens), isolate_failures=False, **options)

    def start(self, prompts: Seq[Seq[int]], choices: Seq[tuple[GenerationConfig, int]]
              ) -> tuple[Engine, list[Sequence], deque[tuple[int, Event]]]:
        """An engine with every prompt queued once per choice (config, sample index: seed + index), the choices of
        a prompt sharing its prefill; row i·len(choices) + j is choice j of prompt i. The events arrive in the
        returned queue as (row, event)."""
        if not choices:
            raise ValueError("no choices given: at least one (config, sample index) per prompt")
        return self.start_each(prompts, [choices] * len(prompts))

    def start_each(self, prompts: Seq[Seq[int]], choices: Seq[Seq[tuple[GenerationConfig, int]]]
                   ) -> tuple[Engine, list[Sequence], deque[tuple[int, Event]]]:
        """``start`` with each prompt's own choices (as many for every prompt): e.g. its own stop strings."""
        prompts = check_prompts(prompts, self.model.config.vocab_size, self.model.config.max_seq_len)
        if len(choices) != len(prompts) or len({len(c) for c in choices}) != 1 or not choices[0]:
            raise ValueError(f"need the same number (>= 1) of choices for each of the {len(prompts)} prompts, got "
                             f"{[len(c) for c in choices]}")
        n = len(choices[0])
        longest = max(len(p) + max(c.max_new_tokens for c, _ in each) for p, each in zip(prompts, choices))
        engine = self.call_engine(len(prompts) * n, longest)
        events: deque[tuple[int, Event]] = deque()
        seqs = [Sequence(p, config, lambda e, row=i * n + j: events.append((row, e)), sample_index=index)
                for i, (p, each) in enumerate(zip(prompts, choices)) for j, (config, index) in enumerate(each)]
        engine.add([seqs[i * n:(i + 1) * n] for i in range(len(prompts))], fit_budget=False)
        return engine, seqs, events

    def generate(self, prompts: Seq[Seq[int]], config: GenerationConfig | Seq[GenerationConfig], n: int = 1,
                 progress: str | None = None) -> list[Completion]:
        """Every completion, row i·n + j being sample j of prompt i (seed + j); ``config`` one for all prompts or
        one per prompt. ``progress``: a bar with this description counts finished completions (on a terminal)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        configs = [config] * len(prompts) if isinstance(config, GenerationConfig) else list(config)
        return self._drive(*self.start_each(prompts, [[(c, j) for j in range(n)] for c in configs]), progress)

    def generate_choices(self, prompts: Seq[Seq[int]], choices: Seq[tuple[GenerationConfig, int]]
                         ) -> list[Completion]:
        """For every prompt one completion per choice (its own options, e.g. a greedy answer and seeded samples),
        all of a prompt's choices sharing one prefill; row i·len(choices) + j is choice j of prompt i."""
        return self._drive(*self.start(prompts, choices))

    def _drive(self, engine: Engine, seqs: list[Sequence], events: deque[tuple[int, Event]],
               progress: str | None = None) -> list[Completion]:
        got: list[list[TokenEvent]] = [[] for _ in seqs]
        with progress_bar(len(seqs), progress or "", enabled=None if progress else False) as advance:
            while engine.has_work():
                engine.step()
                while events:
                    row, event = events.popleft()
                    got[row].append(token := _token(event))
                    if token.finish_reason is not None:
                        advance(1)
        return [Completion.from_events(g, self.tokenizer is not None, self.probe is not None) for g in got]

    def stream(self, prompt: Seq[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        """Each token of one prompt as soon as its event is out (with an "own" probe: once it is scored)."""
        engine, _, events = self.start([prompt], [(config, 0)])
        while engine.has_work():
            engine.step()
            while events:
                yield _token(events.popleft()[1])


def _token(event: Event) -> TokenEvent:
    if isinstance(event, ErrorEvent):
        raise GenerationError(event.message)
    return event
