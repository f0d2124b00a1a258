"""Text in, text out: what ``lm.generate``, ``lm.stream``, ``lm.sample`` and ``lm.chat`` do, on the engine.

Prompts are encoded with the checkpoint's tokenizer (or given as token ids), options are checked
(``GenerationConfig.from_kwargs``: unknown names and bad values fail before any compute), and the engine decodes
(generate/engine.py, driven synchronously by generate/offline.py), turning ids into text as it goes and cutting at
stop strings. Token ids and log-probabilities include every generated token up to the one that ended the sequence
(EOS, a stop token or the token completing a stop string); the text excludes the stop string and, by default,
special tokens — as the OpenAI API does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..tokenizer import pad_id
from .beam_search import beam_search
from .events import Completion, TokenEvent
from .generation_config import GenerationConfig
from .offline import Generator
from .strategies import AnswerExtractor, Scorer, Vote, best_of, last_number, majority_vote, mean_logprob

Prompt = str | Sequence[int]


def encode_prompts(gen: Generator, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes) or len(prompts) == 0:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if gen.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json, so text cannot be encoded: give token ids")
            out.append(gen.tokenizer.encode(p))
        else:
            out.append(list(p))
    return out


def generate(gen: Generator, prompts: Prompt | Sequence[Prompt], *, best_of_n: int = 1,
             scorer: Scorer = mean_logprob, num_return_sequences: int = 1, **options: Any) -> list[Completion]:
    """One completion per prompt (best of ``best_of_n`` samples when > 1)."""
    if best_of_n > 1 and "temperature" not in options:
        options["temperature"] = 1.0  # N greedy samples would all be the same
    config = GenerationConfig.from_kwargs(**options)
    ids = encode_prompts(gen, prompts)
    if config.num_beams > 1:
        return _beam(gen, ids, config, num_return_sequences)
    if num_return_sequences != 1:
        raise ValueError("num_return_sequences > 1 applies to beam search; use lm.sample(prompt, n=...) for samples")
    completions = gen.generate(ids, config, n=best_of_n)
    if best_of_n == 1:
        return completions
    return [best_of(completions[i * best_of_n : (i + 1) * best_of_n], scorer) for i in range(len(ids))]


def _beam(gen: Generator, ids: list[list[int]], config: GenerationConfig, num_return_sequences: int
          ) -> list[Completion]:
    if config.stop:
        raise ValueError("stop strings are not supported with beam search; use stop_token_ids")
    results = beam_search(gen.model, ids, config, gen.eos_token_ids, pad_id(gen.tokenizer),
                          num_return_sequences=num_return_sequences)
    flat = [c for per_prompt in results for c in per_prompt]
    if gen.tokenizer is not None:
        for c in flat:
            c.text = gen.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    return flat


def stream(gen: Generator, prompt: Prompt, **options: Any) -> Iterator[TokenEvent]:
    """Yield each token as soon as it is decoded (with an "own"-aligned probe: as soon as it is scored, one
    decode step later); the texts concatenate to the final text."""
    config = GenerationConfig.from_kwargs(**options)
    if config.num_beams > 1:
        raise ValueError("beam search cannot stream: its best sequence is known only at the end")
    ids = encode_prompts(gen, prompt)
    if len(ids) != 1:
        raise ValueError("stream takes one prompt; use generate for a batch")
    return gen.stream(ids[0], config)


def sample(gen: Generator, prompt: Prompt, n: int, **options: Any) -> list[Completion]:
    """``n`` independent samples of one prompt (the prompt is prefilled once)."""
    options.setdefault("temperature", 1.0)
    config = GenerationConfig.from_kwargs(**options)
    return gen.generate(encode_prompts(gen, prompt)[:1], config, n=n)


def self_consistency(gen: Generator, prompt: Prompt, n: int = 8, extract: AnswerExtractor = last_number,
                     **options: Any) -> Vote:
    """Majority vote over the answers of ``n`` samples."""
    return majority_vote(sample(gen, prompt, n, **options), extract)


def chat_prompt(gen: Generator, messages: list[dict]) -> list[int]:
    """The token ids of a conversation rendered with the checkpoint's chat template."""
    if gen.tokenizer is None:
        raise ValueError("chat needs a tokenizer; this checkpoint has no tokenizer.json")
    return gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
