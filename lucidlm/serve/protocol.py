"""The OpenAI request bodies the server accepts, checked field by field before any work is done.

Names, types and ranges are OpenAI's (``/v1/completions`` and ``/v1/chat/completions``), plus the sampling
options OpenAI lacks and vLLM accepts: ``top_k``, ``min_p``, ``repetition_penalty``. Types are strict (a
string where a number belongs is an error, as with OpenAI) and unknown fields are errors naming the field
(OpenAI: "Unrecognized request argument supplied"), never silently ignored.

Every value is one the decode step can compute: one request's options run in the same batch as other
clients', so a value that overflows float32 there (a temperature of 1e-39) is refused here with a 400 naming
the field, and every string must be valid Unicode (JSON can carry a lone surrogate such as ``"\ud800"``,
which no tokenizer and no UTF-8 response can hold).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import OpenAIError, encodable

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}  # pydantic's union-member loc entries

# vLLM raises temperatures in (0, 0.01) to 0.01 (its _MAX_TEMP) because logits / T overflows below it; a
# silent change of what was asked is worse than an error, so here they are refused
MIN_TEMPERATURE = 0.01
# the repetition penalty divides (or multiplies) a seen token's logit: the same overflow as 1 / temperature
# below 0.01, and nothing left to penalise above 100 (a positive logit is then ~0)
REPETITION_PENALTY = (0.01, 100.0)
MAX_LOGIT_BIAS = 1024  # entries: the batch's bias is rebuilt (in Python) whenever its rows change
MAX_STOP_CHARS = 256  # the text that may start a stop string is looked for at every token, in the batcher's thread
_TOKEN_ID = re.compile(r"[0-9]+")  # ASCII only: str.isdigit and int() also take "²", "١٢", "５"


def _unicode(text: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"must be valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at position "
                             f"{e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string of a request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_call_id: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: Text
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, validate_default=True)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: Text | None = None
    # beyond OpenAI, as vLLM names them
    top_k: int | None = Field(None, ge=0, lt=2**63)  # above the vocabulary: every token kept (vLLM clamps)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = None
    ignore_eos: bool = False  # vLLM's: decode past end-of-sequence (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences have at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {v}: dividing the logits by a "
                             "smaller temperature overflows them")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v: float | None) -> float | None:
        low, high = REPETITION_PENALTY
        if v is not None and not low <= v <= high:
            raise ValueError(f"must be in [{low}, {high:g}] (1 = off), got {v}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens, got {len(v)}")
        for token, bias in (v or {}).items():
            if not _TOKEN_ID.fullmatch(token):
                raise ValueError(f"keys must be token ids in ASCII digits, got {encodable(token[:20])!r}")
            if len(token.lstrip("0")) > 18:  # beyond any vocabulary (and int() refuses 4300 digits)
                raise ValueError(f"token id {token[:20]}... is outside the vocabulary")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {token[:20]}")
        return v

    @model_validator(mode="after")
    def _options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def sampling_options(self) -> dict:
        """The lucidlm generation options (GenerationConfig.from_kwargs names) this request asks for.
        OpenAI samples at temperature 1 unless told otherwise, so that is the default here too."""
        return dict(temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p,
                    top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()} or None,
                    stop=tuple(self.stop), ignore_eos=self.ignore_eos)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def generated_per_prompt(self) -> int:
        return self.n

    @property
    def n_top_logprobs(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)  # generate this many per prompt, return the n best
    # lucidlm: how best_of ranks — OpenAI's highest mean log-probability per token, or the probe's
    # lowest highest token score (the sample whose riskiest token is safest; needs --probe)
    best_of_scorer: Literal["mean_logprob", "lowest_max_score"] = "mean_logprob"

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.stream and self.generated_per_prompt > self.n:
            raise ValueError("best_of > n cannot be streamed: the best are known only at the end")
        return self

    @property
    def generated_per_prompt(self) -> int:
        return self.best_of or self.n

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            v = [v]
        elif v and isinstance(v[0], int):
            v = [v]
        if not v:
            raise ValueError("must not be empty")
        for i, p in enumerate(v):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        return v

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens

    @property
    def n_top_logprobs(self) -> int:
        return self.logprobs or 0


def parse(model: type[_Strict], data: object) -> _Strict:
    """Validate a JSON body; the first problem becomes a 400 naming the field (``messages[0].role``)."""
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # a union reports every member's error; one from a validator here says what is wrong, where "should be a
        # valid string" (the first member's) would not
        first = next((x for x in errors if x["type"] == "value_error"), errors[0])
        param = field_path(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "required"
        elif first["type"] == "extra_forbidden":
            message = "unrecognized request argument"
        raise OpenAIError(400, f"{param}: {message}" if param else message, param=param or None) from None


def field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS or part.startswith(("function-", "literal[")):
            continue  # which member of a union failed: not a field
        else:
            path += f".{part}" if path else part
    return path
