"""Text in, text out: what ``lm.generate``, ``lm.stream`` and ``lm.chat`` do.

Prompts are encoded with the checkpoint's tokenizer (or given as token ids), options are checked
(``GenerationConfig.from_kwargs``: unknown names and bad values fail before any compute), the
engine decodes, and ``TextAssembler`` turns ids into text, cutting at stop strings.
Token ids and log-probabilities include every generated token up to the one that ended the
sequence (EOS, a stop token or the token completing a stop string); the text excludes the stop
string and, by default, special tokens — as the OpenAI API does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .beam_search import beam_search
from .engine import Completion, Engine, Step
from .generation_config import GenerationConfig
from .strategies import AnswerExtractor, Scorer, Vote, best_of, last_number, majority_vote, mean_logprob
from .text import TextAssembler

if TYPE_CHECKING:
    from ..api import LM

Prompt = str | Sequence[int]


@dataclass
class StreamToken:
    token_id: int
    text: str  # the text this token makes visible (may be "" while a character or stop string is pending)
    logprob: float
    finish_reason: str | None = None  # set on the last token
    # hallucination score of this token when a probe is loaded (None under the "own" alignment for a
    # last token that filled the context: it was never fed, so it has no hidden state)
    score: float | None = None


def encode_prompts(lm: LM, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes) or len(prompts) == 0:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            out.append(lm.encode(p))
        else:
            out.append(list(p))
    return out


def engine_for(lm: LM, prefill_chunk: int = 512) -> Engine:
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    return Engine(lm.model, eos_token_ids=lm.eos_token_ids, pad_token_id=pad, prefill_chunk=prefill_chunk,
                  compile=lm.compile_decode)


def _assemblers(lm: LM, config: GenerationConfig, n_rows: int) -> list[TextAssembler] | None:
    if lm.tokenizer is None:
        if config.stop:
            raise ValueError("stop strings need a tokenizer; this checkpoint has no tokenizer.json")
        return None
    return [TextAssembler(lm.tokenizer, config.stop) for _ in range(n_rows)]


def generate(
    lm: LM,
    prompts: Prompt | Sequence[Prompt],
    *,
    best_of_n: int = 1,
    scorer: Scorer = mean_logprob,
    num_return_sequences: int = 1,
    **options: Any,
) -> list[Completion]:
    """One completion per prompt (best of ``best_of_n`` samples when > 1)."""
    if best_of_n > 1 and "temperature" not in options:
        options["temperature"] = 1.0  # N greedy samples would all be the same
    config = GenerationConfig.from_kwargs(**options)
    ids = encode_prompts(lm, prompts)
    if config.num_beams > 1:
        return _beam(lm, ids, config, num_return_sequences)
    if num_return_sequences != 1:
        raise ValueError("num_return_sequences > 1 applies to beam search; use lm.sample(prompt, n=...) for samples")
    completions = sample_ids(lm, ids, config, n=best_of_n)
    if best_of_n == 1:
        return completions
    return [best_of(completions[i * best_of_n : (i + 1) * best_of_n], scorer) for i in range(len(ids))]


def probe_scorer(lm: LM) -> tuple[list[int], Callable[[Step], list[float]] | None, str]:
    """(hidden layers to hand out, step -> a score per fed row (``step.hidden_rows``), alignment) for the
    LM's probe, if it has one. The score is the head on each row's last fed position: under "predictive"
    the state that decoded the step's token, under "own" the state of the token fed to that forward."""
    if lm.probe is None:
        return [], None, "predictive"
    head, layer = lm.probe.head, lm.probe.config.layer

    def scores(step: Step) -> list[float]:
        with torch.no_grad():
            return head.scores(step.hidden[layer][:, -1]).tolist()

    return [layer], scores, lm.probe.config.alignment


def sample_ids(lm: LM, ids: list[list[int]], config: GenerationConfig, n: int = 1) -> list[Completion]:
    """``n`` completions per prompt, row i·n + j being sample j of prompt i, with their text."""
    engine = engine_for(lm)
    layers, scorer, alignment = probe_scorer(lm)
    texts = _assemblers(lm, config, len(ids) * n)

    def stop_string_seen(row: int, generated: list[int]) -> bool:
        texts[row].push(generated[-1])
        return texts[row].stopped

    completions = engine.generate(ids, config, n=n, should_stop=stop_string_seen if texts else None,
                                  hidden_layers=layers, token_scores=scorer, alignment=alignment)
    if texts:
        for c, t in zip(completions, texts):
            t.finish()
            c.text = t.text
    return completions


def _beam(lm: LM, ids: list[list[int]], config: GenerationConfig, num_return_sequences: int) -> list[Completion]:
    if config.stop:
        raise ValueError("stop strings are not supported with beam search; use stop_token_ids")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    results = beam_search(lm.model, ids, config, lm.eos_token_ids, pad, num_return_sequences=num_return_sequences)
    flat = [c for per_prompt in results for c in per_prompt]
    if tok is not None:
        for c in flat:
            c.text = tok.decode(c.token_ids, skip_special_tokens=True)
    return flat


def stream(lm: LM, prompt: Prompt, **options: Any) -> Iterator[StreamToken]:
    """Yield each token as soon as it is decoded (with an "own"-aligned probe: as soon as it is scored, one
    decode step later); the texts concatenate to the final text."""
    config = GenerationConfig.from_kwargs(**options)
    if config.num_beams > 1:
        raise ValueError("beam search cannot stream: its best sequence is known only at the end")
    ids = encode_prompts(lm, prompt)
    if len(ids) != 1:
        raise ValueError("stream takes one prompt; use generate for a batch")
    texts = _assemblers(lm, config, 1)
    text = texts[0] if texts else None
    pieces: list[str] = []

    def stop_string_seen(row: int, generated: list[int]) -> bool:
        pieces.append(text.push(generated[-1]))
        return text.stopped

    engine = engine_for(lm)
    layers, scorer, alignment = probe_scorer(lm)
    own = scorer is not None and alignment == "own"
    held: StreamToken | None = None  # "own": the last token, waiting for the forward it is fed to
    for step in engine.steps(ids, config, should_stop=stop_string_seen if text else None, hidden_layers=layers,
                             feed_last=own):
        score = scorer(step)[0] if scorer else None  # of the one row's fed position
        if held is not None:  # "own": this forward was fed the held token, so it scored it
            held.score = score
            yield held
            held = None
        if not step.rows:  # the last forward: it only fed the finished token
            break
        reason = step.finished.get(0)
        piece = pieces.pop() if text else ""
        if reason is not None and text is not None:
            piece += text.finish()
        token = StreamToken(step.token_ids[0], piece, step.logprobs[0], reason, None if own else score)
        if own:
            held = token
        else:  # "predictive": the forward that decoded the token scored it
            yield token
    if held is not None:  # it filled the context, so no forward was fed it: no score
        yield held


def sample(lm: LM, prompt: Prompt, n: int, **options: Any) -> list[Completion]:
    """``n`` independent samples of one prompt (the prompt is prefilled once)."""
    options.setdefault("temperature", 1.0)
    config = GenerationConfig.from_kwargs(**options)
    return sample_ids(lm, encode_prompts(lm, prompt)[:1], config, n=n)


def self_consistency(lm: LM, prompt: Prompt, n: int = 8, extract: AnswerExtractor = last_number,
                     **options: Any) -> Vote:
    """Majority vote over the answers of ``n`` samples."""
    return majority_vote(sample(lm, prompt, n, **options), extract)


def chat_prompt(lm: LM, messages: list[dict]) -> list[int]:
    """The token ids of a conversation rendered with the checkpoint's chat template."""
    if lm.tokenizer is None:
        raise ValueError("chat needs a tokenizer; this checkpoint has no tokenizer.json")
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
