"""From a request's bytes to what the batcher needs: prompt ids and a GenerationConfig, every check done.

    read_body (event loop: bounded in bytes and time) ─▶ Preparer (worker thread): JSON ─▶ fields (protocol.py)
        ─▶ text capped in characters ─▶ chat template ─▶ token ids ─▶ context and option checks ─▶ Prepared

Parsing, rendering and tokenizing cost CPU in proportion to the request (a 4 MiB body, a long conversation);
on the event loop they would stall /health and every stream, so the server runs the ``Preparer`` in worker
threads and only queues and streams on the loop. Text is capped in characters before it is tokenized: no token
covers more characters than the vocabulary's longest entry, so a text longer than the context times that
cannot fit (a normaliser that deletes characters could make such a text fit; ``max_prompt_chars`` is
configurable for that case).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi import Request

from ..api import LM
from ..generate.generation_config import GenerationConfig
from ..jsonl import MAX_PARSE_DEPTH, json_depth
from .errors import OpenAIError
from .protocol import ChatCompletionRequest, CompletionRequest, parse

Body = ChatCompletionRequest | CompletionRequest


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes — by its Content-Length or by
    the bytes received so far, never after buffering it — or (408) when it takes more than ``timeout`` s."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the request body has {declared} bytes; the limit is {limit}", close=True)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise OpenAIError(413, f"the request body exceeds the limit of {limit} bytes", close=True)
                chunks.append(chunk)
    except TimeoutError:
        raise OpenAIError(408, f"the request body did not arrive within {timeout:g} s", close=True) from None
    return b"".join(chunks)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")  # Python's json reads NaN and Infinity; JSON has neither


def parse_json(raw: bytes) -> object:
    if raw.count(b"[") + raw.count(b"{") > MAX_PARSE_DEPTH and json_depth(raw) > MAX_PARSE_DEPTH:
        raise OpenAIError(400, f"the request body is not valid JSON: it is nested too deeply (more than "
                               f"{MAX_PARSE_DEPTH} levels)")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise OpenAIError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN, an integer of more than 4300 digits
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None


@dataclass
class Prepared:
    """A checked request, ready to queue."""

    body: Body
    prompts: list[list[int]]
    config: GenerationConfig
    prefixes: list[str]  # per choice: the echoed prompt (completions with echo) or ""
    chat: bool


class Preparer:
    """The CPU side of a generation request; thread-safe, run in a worker thread."""

    def __init__(self, lm: LM, model_name: str, max_len: int, max_batch: int, max_prompts: int,
                 max_prompt_chars: int | None = None) -> None:
        self.lm, self.model_name, self.max_len = lm, model_name, max_len
        self.max_batch, self.max_prompts = max_batch, max_prompts
        self.vocab = lm.model.config.vocab_size
        self.max_chars = max_prompt_chars or max_len * longest_token(lm)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise OpenAIError(404, f"The model '{name[:200]}' does not exist; this server serves "
                                   f"'{self.model_name}'", param="model", code="model_not_found")

    # --- the two routes --------------------------------------------------------------------------------
    def chat(self, raw: bytes) -> Prepared:
        body = parse(ChatCompletionRequest, parse_json(raw))
        self.check_model(body.model)
        tok = self.lm.tokenizer
        if tok is None:
            raise OpenAIError(400, "this model has no tokenizer, so messages cannot be rendered")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # no template, or the template rejects the conversation (raise_exception)
            raise OpenAIError(400, f"messages: the chat template cannot render them: {e}", param="messages") from None
        self.check_chars(len(text), "messages")
        prompt = tok.encode(text, add_special_tokens=False)  # as apply_chat_template(tokenize=True): BOS is written
        return Prepared(body, [prompt], self.generation_config(body, [prompt], "messages"), [""] * body.n, True)

    def completions(self, raw: bytes) -> Prepared:
        body = parse(CompletionRequest, parse_json(raw))
        self.check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs (prompt log-probabilities) is not supported", param="echo")
        if len(body.prompt) > self.max_prompts:
            raise OpenAIError(400, f"prompt: at most {self.max_prompts} prompts per request, got {len(body.prompt)}",
                              param="prompt")
        prompts = [self.prompt_ids(i, p) for i, p in enumerate(body.prompt)]
        echoed = [(p if isinstance(p, str) else self.text_of(p)) if body.echo else "" for p in body.prompt]
        prefixes = [e for e in echoed for _ in range(body.n)]
        return Prepared(body, prompts, self.generation_config(body, prompts, "prompt"), prefixes, False)

    # --- pieces ------------------------------------------------------------------------------------------
    def prompt_ids(self, i: int, p: str | list[int]) -> list[int]:
        if isinstance(p, str):
            if self.lm.tokenizer is None:
                raise OpenAIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
            self.check_chars(len(p), "prompt")
            return self.lm.encode(p)
        bad = [t for t in p if not 0 <= t < self.vocab]
        if bad:
            raise OpenAIError(400, f"prompt[{i}]: token ids outside [0, {self.vocab}): {bad[:5]}", param="prompt")
        return list(p)

    def text_of(self, ids: list[int]) -> str:
        return self.lm.decode(ids, skip_special_tokens=True) if self.lm.tokenizer is not None else ""

    def check_chars(self, chars: int, field: str) -> None:
        if chars > self.max_chars:
            raise OpenAIError(400, f"{field}: this model's maximum context length is {self.max_len} tokens; the "
                                   f"request has {chars} characters in the {field}, more than {self.max_chars} "
                                   f"tokens can hold", param=field, code="context_length_exceeded")

    def generation_config(self, body: Body, prompts: list[list[int]], field: str) -> GenerationConfig:
        longest = max(len(p) for p in prompts)
        budget = body.token_budget
        if longest >= self.max_len or (budget is not None and longest + budget > self.max_len):
            asked = f" + {budget} to generate" if budget is not None else ""
            raise OpenAIError(400, f"{field}: this model's maximum context length is {self.max_len} tokens; the "
                                   f"request has {longest} in the {field}{asked}", param=field,
                              code="context_length_exceeded")
        if body.generated_per_prompt > self.max_batch:
            field = "best_of" if body.generated_per_prompt > body.n else "n"
            raise OpenAIError(400, f"{field}: at most {self.max_batch} sequences per prompt (the server's batch)",
                              param=field)
        if getattr(body, "best_of_scorer", None) == "lowest_max_score" and self.lm.probe is None:
            raise OpenAIError(400, "best_of_scorer: lowest_max_score ranks by the probe's scores; start the server "
                                   "with --probe", param="best_of_scorer")
        bad = [k for k in body.logit_bias or {} if int(k) >= self.vocab]
        if bad:
            raise OpenAIError(400, f"logit_bias: token ids outside the vocabulary of {self.vocab}: {bad[:5]}",
                              param="logit_bias")
        try:
            return GenerationConfig.from_kwargs(max_new_tokens=budget or self.max_len - longest,
                                                **body.sampling_options())
        except (TypeError, ValueError) as e:
            raise OpenAIError(400, str(e)) from None


def longest_token(lm: LM) -> int:
    """Characters of the vocabulary's longest entry (added tokens included: they match in the text), >= 1."""
    if lm.tokenizer is None:
        return 1
    return max((len(t) for t in lm.tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
