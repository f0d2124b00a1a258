"""One sequence to generate: a prompt, its options, and where its events go (a sink).

A request with ``n`` choices is a group of ``n`` sequences sharing one prompt; the engine prefills that prompt
once and copies its cache slot to the others (sample j of a seeded request draws with seed + j).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from .events import Event
from .generation_config import GenerationConfig


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt: list[int], config: GenerationConfig, sink: Callable[[Event], None], *,
                 top_logprobs: int = 0, sample_index: int = 0) -> None:
        self.prompt = prompt
        self.config = config
        self.sink = sink
        self.top_logprobs = top_logprobs
        self.sample_index = sample_index
        self.cancelled = False
        self.generated: list[int] = []
        self.submitted = time.perf_counter()
        self.uid = next(Sequence._ids)  # slots are reused; the sampler's cache keys on sequences

    def cancel(self) -> None:
        """The client went away: the engine drops the sequence before its next step."""
        self.cancelled = True
