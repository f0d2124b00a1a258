"""The inference engine: prefill, then decode one token per step against the KV cache.

    prompts ─left-pad─▶ prefill (one forward per chunk, fills the cache)
            ─▶ loop: logits ─processors─▶ next token per row ─▶ forward of just those tokens

Notes 003 §1.3.5: prefill is compute-bound (many tokens, one pass over the weights); decode is
memory-bound (every step streams all weights for one token per row), which is why batching rows
makes decode cheaper per token.

Each row owns one cache slot. A row that finishes (EOS, a stop token or string, its token budget,
the context) leaves the running batch, so it stops costing compute; later steps pass only the
remaining slots. The serving issue reuses this: requests enter free slots between steps.

``steps`` yields one ``Step`` per forward, carrying the new tokens, their log-probabilities and, on
request, the hidden states of chosen layers for the tokens fed in that forward — what a
hallucination probe scores. A probe at the "own" alignment scores a token from the state computed
when the token is fed, one forward after it was sampled; ``steps(feed_last=True)`` therefore feeds
a finished row its last token once more (logits unused, nothing sampled) before the row leaves.
That forward writes the last token's K/V into the one cell the sequence still had free: the prefill
produces the first new token without writing a cell for it, so prompt + max_new_tokens cells hold
every token once fed. Only a row that ended because the context (the cache) was full cannot be fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model.kv_cache import KVCache
from ..model.transformer import ModelOutput, Transformer
from .generation_config import GenerationConfig
from .sampling import BatchSampling


@dataclass
class Step:
    """What one forward produced. ``rows`` index the expanded request (prompt i, sample j → i·n + j)."""

    rows: list[int]  # the rows that sampled a token from this forward's logits
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the model's own distribution (before processors)
    finished: dict[int, str] = field(default_factory=dict)  # row -> "stop" | "length"
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (hidden_rows, fed tokens, dim)
    prefill: bool = False  # the forward that consumed the prompts (hidden covers the left-padded prompt)
    # the rows this forward was fed, in the order of ``hidden``: ``rows`` first, then (feed_last) the
    # rows that finished at the previous step and were fed their last token once more
    hidden_rows: list[int] = field(default_factory=list)


@dataclass
class Completion:
    """One generated sequence."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    text: str | None = None
    score: float | None = None  # best-of-N / beam score when a strategy ranked it
    # per-token hallucination scores when a probe is loaded; None for a last token that ended a full
    # context under the "own" alignment (it was never fed, so no state of it exists)
    scores: list[float | None] | None = None

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / max(len(self.logprobs), 1)


class Engine:
    def __init__(
        self,
        model: Transformer,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        prefill_chunk: int = 512,
        compile: bool = False,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.prefill_chunk = prefill_chunk
        self.compile = compile  # decode steps run as one torch.compile'd graph over a static cache

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- checks before any compute -------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        cfg = self.model.config
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not prompts:
            raise ValueError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            p = list(p)
            if not p:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size}): {bad[:5]}")
            if len(p) >= cfg.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {cfg.max_seq_len}, "
                                 "which leaves no room to generate")
            out.append(p)
        return out

    # --- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def steps(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        n: int = 1,
        hidden_layers: Sequence[int] = (),
        should_stop: Callable[[int, list[int]], bool] | None = None,
        feed_last: bool = False,
    ) -> Iterator[Step]:
        """Generate for every prompt ``n`` times; yield each forward's tokens as they are decoded.

        should_stop(row, generated ids) is called for every new token and lets the caller end a row
        (stop strings live at the text level). feed_last: a finished row is fed its last token in the
        next forward (its ``hidden_rows``) so that the token's own hidden state exists; when every row
        has finished, that is one last forward of just those rows (a Step with no ``rows``).
        """
        prompts = self.check_prompts(prompts)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.model._wanted(hidden_layers)  # raises on a bad layer index before any compute
        cfg = self.model.config
        n_rows = len(prompts) * n
        longest = max(len(p) for p in prompts)
        cache = KVCache(cfg, n_rows, self._cache_len(longest + config.max_new_tokens), self.dtype,
                        self.device, chunk_size=self.prefill_chunk, static=self.compile)

        # Prefill each distinct prompt once; its n samples share the cache by copying the slot.
        first_rows = [i * n for i in range(len(prompts))]
        logits, hidden = self.prefill(cache, prompts, first_rows, hidden_layers)
        if n > 1:
            for r in first_rows:
                cache.copy_slot(r, range(r + 1, r + n))
            logits = logits.repeat_interleave(n, 0)
            hidden = {k: v.repeat_interleave(n, 0) for k, v in hidden.items()}
        row_prompts = [prompts[r // n] for r in range(n_rows)]
        sampler = _RowSampler(config, row_prompts, n, cfg.vocab_size, self.device)
        generated: list[list[int]] = [[] for _ in range(n_rows)]
        active = list(range(n_rows))  # rows that sample next: they lead the logits (rows fed once more follow)
        fed = active  # the rows the last forward was fed (hidden_rows)
        is_prefill = True
        while True:
            step = Step(active, [], [], hidden=hidden, prefill=is_prefill, hidden_rows=fed)
            if active:
                tokens, logprobs = sampler.next(logits[: len(active)], active)  # finished rows' logits: unused
                step.token_ids, step.logprobs = tokens.tolist(), logprobs.tolist()
            for row, tok in zip(active, step.token_ids):
                generated[row].append(tok)
                # should_stop sees every token (text layers detokenize through it)
                stop_now = should_stop is not None and should_stop(row, generated[row])
                reason = "stop" if stop_now else self.finish_reason(tok, generated[row], config,
                                                                      cache.lengths[row], cache.max_len)
                if reason is not None:
                    step.finished[row] = reason
            yield step
            keep = [i for i, row in enumerate(active) if row not in step.finished]
            # feed_last: rows that just finished go through the next forward once more, after the others,
            # unless the context is full (then their last token cannot be fed and has no hidden state)
            last = [i for i, row in enumerate(active)
                    if feed_last and row in step.finished and cache.lengths[row] < cache.max_len]
            if not keep and not last:
                return
            if keep and len(keep) < len(active):
                sampler.keep(keep)
            fed = [active[i] for i in keep + last]
            logits, hidden = split_output(self.decode(cache, tokens[keep + last, None], fed, hidden_layers))
            logits = logits[:, -1]
            active = [active[i] for i in keep]
            is_prefill = False

    def decode(self, cache: KVCache, tokens: torch.Tensor, slots: list[int],
               hidden_layers: Sequence[int] = ()) -> torch.Tensor | ModelOutput:
        """One decode step: tokens (rows, 1) continue the sequences in cache ``slots``."""
        if not self.compile:
            return self.model(tokens, cache=cache, slots=slots, last_only=True, hidden_layers=hidden_layers)
        # A compiled step is specialised to its shapes: run a power-of-two number of rows, filling
        # up with slots whose sequences have finished (never longer than the fed ones, so never overflow), and
        # drop their outputs. The batch thus shrinks 8 -> 4 -> 2 -> 1 and compiles a handful of times.
        rows = len(slots)
        width = min(cache.n_slots, 1 << (rows - 1).bit_length())
        if width > rows:
            taken = set(slots)
            spare = [s for s in range(cache.n_slots) if s not in taken][: width - rows]
            slots = slots + spare
            tokens = torch.cat([tokens, tokens.new_full((len(spare), 1), self.pad_token_id)])
        plan = cache.begin(slots, 1)  # host-side bookkeeping stays out of the compiled graph
        out = compiled_forward(self.model)(tokens, plan, cache, hidden_layers=tuple(hidden_layers), last_only=True)
        if width == rows:
            return out
        if isinstance(out, ModelOutput):
            return ModelOutput(out.logits[:rows], {k: h[:rows] for k, h in out.hidden_states.items()}, None)
        return out[:rows]

    def _cache_len(self, tokens: int) -> int:
        """Cache cells for sequences of up to ``tokens``; compiled steps round up to a multiple of
        STATIC_LEN_STEP so that calls of similar lengths share one compiled shape."""
        if self.compile:
            tokens = -(-tokens // STATIC_LEN_STEP) * STATIC_LEN_STEP
        return min(self.model.config.max_seq_len, tokens)

    def finish_reason(self, tok: int, generated: list[int], config: GenerationConfig, length: int,
                       max_len: int) -> str | None:
        if (tok in self.eos_token_ids and not config.ignore_eos) or tok in config.stop_token_ids:
            return "stop"
        if len(generated) >= config.max_new_tokens or length >= max_len:
            return "length"  # budget spent, or the context is full (this token cannot be fed back)
        return None

    def prefill(self, cache: KVCache, prompts: list[list[int]], slots: list[int],
                 hidden_layers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Left-pad the prompts and run them through the model chunk by chunk; logits of the last token."""
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pieces: dict[int, list[torch.Tensor]] = {}
        for start in range(0, longest, self.prefill_chunk):
            end = min(start + self.prefill_chunk, longest)
            out = self.model(ids[:, start:end], attention_mask=mask[:, start:end], cache=cache, slots=slots,
                             last_only=True, hidden_layers=hidden_layers)
            logits, hidden = split_output(out)
            for layer, h in hidden.items():
                pieces.setdefault(layer, []).append(h)
        return logits[:, -1], {layer: torch.cat(hs, 1) for layer, hs in pieces.items()}

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        n: int = 1,
        should_stop: Callable[[int, list[int]], bool] | None = None,
        hidden_layers: Sequence[int] = (),
        token_scores: Callable[[Step], list[float]] | None = None,
        alignment: str = "predictive",
    ) -> list[Completion]:
        """All completions, row i·n + j being sample j of prompt i. ``token_scores(step)`` gives a score
        per fed row of each step (``step.hidden_rows``; a probe reading ``step.hidden``), collected into
        ``Completion.scores``: under ``alignment`` "predictive" a forward's score belongs to the token
        sampled from it, under "own" to the token fed to it (see ``steps(feed_last=...)``)."""
        n_rows = len(prompts) * n
        own = token_scores is not None and alignment == "own"
        ids: list[list[int]] = [[] for _ in range(n_rows)]
        lps: list[list[float]] = [[] for _ in range(n_rows)]
        scores: list[list[float | None]] = [[] for _ in range(n_rows)]
        reasons: dict[int, str] = {}
        for step in self.steps(prompts, config, n=n, should_stop=should_stop, hidden_layers=hidden_layers,
                               feed_last=own):
            for row, tok, lp in zip(step.rows, step.token_ids, step.logprobs):
                ids[row].append(tok)
                lps[row].append(lp)
            reasons.update(step.finished)
            # Each row gets one score per forward it is fed to, in order: "predictive", of the token it
            # just sampled; "own", of the token it was fed (its previous one). The prefill was fed the
            # prompt, whose last token is not a generated one.
            if token_scores is not None and not (own and step.prefill):
                for row, score in zip(step.hidden_rows, token_scores(step)):
                    scores[row].append(score)
        if own:  # a row ended by a full context was never fed its last token: no score for it
            for r in range(n_rows):
                scores[r] += [None] * (len(ids[r]) - len(scores[r]))
        return [Completion(ids[r], lps[r], reasons[r], scores=scores[r] if token_scores else None)
                for r in range(n_rows)]


STATIC_LEN_STEP = 256  # compiled decode: cache lengths are rounded up to a multiple of this


def compiled_forward(model: Transformer) -> Callable[..., torch.Tensor | ModelOutput]:
    """``model.forward_planned`` compiled with ``torch.compile``, once per model and kept on it
    (compiling takes seconds; later engines and calls reuse it, recompiling only for new shapes)."""
    fn = model.__dict__.get("_compiled_forward")
    if fn is None:
        fn = torch.compile(model.forward_planned, dynamic=False)  # static shapes: see Engine.decode
        model.__dict__["_compiled_forward"] = fn
    return fn


def split_output(out: torch.Tensor | ModelOutput) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    if isinstance(out, ModelOutput):
        return out.logits, out.hidden_states
    return out, {}


class _RowSampler:
    """Per-row processors, generators and seen-token sets; shrinks as rows finish."""

    def __init__(self, config: GenerationConfig, row_prompts: list[list[int]], n: int, vocab: int,
                 device: torch.device) -> None:
        params = config.sampling
        self.greedy = params.plain_greedy
        self.batch = BatchSampling.from_params([params] * len(row_prompts), device)
        self.generators: list[torch.Generator | None] = [None] * len(row_prompts)
        if not params.greedy and params.seed is not None:  # sample j of a prompt uses seed + j
            self.generators = [torch.Generator(device).manual_seed(params.seed + r % n)
                               for r in range(len(row_prompts))]
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(row_prompts), vocab, dtype=torch.bool, device=device)
            for r, p in enumerate(row_prompts):
                self.seen[r, torch.tensor(p, device=device)] = True
        self.counts = None  # generated tokens per row, for presence/frequency penalties
        if params.counts_tokens:
            self.counts = torch.zeros(len(row_prompts), vocab, dtype=torch.int32, device=device)
        self.params, self.device = params, device

    def next(self, logits: torch.Tensor, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (rows, vocab) -> next token ids (rows,) and their model log-probabilities (rows,)."""
        logits = logits.float()
        if self.greedy:
            tokens = logits.argmax(-1)
        else:
            processed = self.batch.process(logits, self.seen, self.counts)
            tokens = self.batch.sample(processed, self.generators)
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        return tokens, logprobs

    def keep(self, index: list[int]) -> None:
        """Rows at ``index`` (positions in the current batch) stay; the others finished."""
        self.batch = BatchSampling.from_params([self.params] * len(index), self.device)
        self.generators = [self.generators[i] for i in index]
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]
