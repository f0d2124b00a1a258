"""What a generation request asks for, checked before any compute.

Options carry the names of the Python API (and of transformers' ``generate`` where one exists):
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
``seed``, ``stop`` (strings), ``stop_token_ids``, ``num_beams``, ``length_penalty``,
``early_stopping``. An unknown option is an error naming it, never silently ignored.

Greedy or sampling: with no sampling option given, decoding is greedy (as transformers'
``do_sample=False``); giving ``top_k``/``top_p``/``min_p``/``seed`` without a temperature samples at
temperature 1 (OpenAI's default); ``temperature=0`` is greedy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as transformers

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("num_beams", self.num_beams, minimum=1)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        for i in self.stop_token_ids:
            _check_int("stop_token_ids", i, minimum=0)
        if not isinstance(self.length_penalty, int | float) or isinstance(self.length_penalty, bool):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and not self.sampling.greedy:
            raise ValueError("num_beams > 1 is beam search, which is deterministic: drop the sampling options "
                             "(temperature/top_k/top_p/min_p/seed) or use num_beams=1")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationConfig:
        """Build from flat keyword options (the Python API and CLI names); unknown names are errors."""
        known = _SAMPLING_FIELDS | {f.name for f in dataclasses.fields(cls)} - {"sampling"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; valid options: {sorted(known)}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_FIELDS}
        if "temperature" not in sampling:
            samples = any(k in sampling for k in ("top_k", "top_p", "min_p", "seed"))
            sampling["temperature"] = 1.0 if samples else 0.0
        return cls(sampling=SamplingParams(**sampling), **kwargs)

    def replace(self, **kwargs: Any) -> GenerationConfig:
        return dataclasses.replace(self, **kwargs)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
