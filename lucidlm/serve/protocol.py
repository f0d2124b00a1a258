"""The OpenAI request bodies the server accepts, checked field by field before any work is done.

Names, types and ranges are OpenAI's (``/v1/completions`` and ``/v1/chat/completions``), plus the sampling
options OpenAI lacks and vLLM accepts: ``top_k``, ``min_p``, ``repetition_penalty``. Types are strict (a
string where a number belongs is an error, as with OpenAI) and unknown fields are errors naming the field
(OpenAI: "Unrecognized request argument supplied"), never silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import OpenAIError

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}  # pydantic's union-member loc entries


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    # beyond OpenAI, as vLLM names them
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False  # vLLM's: decode past end-of-sequence (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {token}")
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
    prompt: str | list[str] | list[int] | list[list[int]]
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
        first = e.errors()[0]
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
