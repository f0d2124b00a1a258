"""Beam search on the KV cache, returning the sequences of transformers' ``generate(num_beams=...)``.

Every prompt keeps ``num_beams`` running beams and a pool of ``num_beams`` finished hypotheses. A step:

1. each beam's next-token log-probabilities (log_softmax of the logits, then the repetition penalty, in
   transformers' order) plus the beam's running sum give num_beams · vocab candidate continuations;
   at the first step only beam 0 is live (the others start at -1e9), so the beams do not repeat each other;
2. keep the best k = max(2, 1 + #stop tokens) · num_beams, so that at least num_beams of them go on;
3. the num_beams best candidates that do not end become the running beams; the cache follows them
   (``KVCache.reorder``) and their last tokens are fed in one forward;
4. candidates among the best num_beams that end (stop token, or the token budget is spent) enter the
   pool scored sum(log-probs) / generated_len ** length_penalty, where generated_len counts the
   generated tokens, the stop token included, the prompt not; the pool keeps its num_beams best;
5. a prompt is done when the budget is spent, or its pool is full and either early_stopping is True
   or no running beam can still beat the worst finished score: best running sum / L ** length_penalty
   with L the current generated length — or max_new_tokens for early_stopping="never" with
   length_penalty > 0. Its pool is then frozen and it leaves the batch.

Results are the pool in score order. ``-1e9`` marks impossible scores, as in transformers, whose
float32 arithmetic this module repeats so that ties and near-ties resolve the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from .engine import check_prompts
from .events import Completion
from .generation_config import GenerationConfig
from .prefill import prefill
from .sampling import apply_repetition_penalty
from .token_history import TokenHistory

NEG = -1.0e9  # transformers' score for impossible beams


@dataclass
class Beams:
    """num_beams (or k) hypotheses per prompt: the running beams, the candidates or the finished pool."""

    scores: Tensor  # (P, m) float32: running sum of log-probs; in the pool, the length-penalised score
    tokens: Tensor  # (P, m, budget) long: generated ids (only the first ``lengths`` are meaningful)
    logprobs: Tensor  # (P, m, budget) float32: model log-prob of each generated id (before processors)
    lengths: Tensor  # (P, m) long: generated ids held
    ended: Tensor  # (P, m) bool: candidates — hit a stop; pool — a real hypothesis (transformers' is_sent_finished)
    stopped: Tensor  # (P, m) bool: ended on a stop token (finish_reason "stop"), else on the budget

    def gather(self, index: Tensor) -> Beams:
        """Entries ``index`` (P, m') of each prompt, for every field."""
        return Beams(**{f.name: _take(getattr(self, f.name), index) for f in fields(self)})

    def rows(self, rows: Tensor) -> Beams:
        return Beams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def set_rows(self, rows: Tensor, part: Beams) -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(part, f.name)

    def cat(self, other: Beams) -> Beams:
        return Beams(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)], 1) for f in fields(self)})

    @classmethod
    def empty(cls, prompts: int, m: int, budget: int, score: float, device: torch.device) -> Beams:
        scores = torch.full((prompts, m), score, dtype=torch.float32, device=device)
        flags = torch.zeros(prompts, m, dtype=torch.bool, device=device)
        return cls(scores, torch.zeros(prompts, m, budget, dtype=torch.long, device=device),
                   torch.zeros(prompts, m, budget, device=device), torch.zeros(prompts, m, dtype=torch.long,
                   device=device), flags, flags.clone())


def _take(t: Tensor, index: Tensor) -> Tensor:
    """t (P, m, ...) and index (P, m') -> (P, m', ...)."""
    return t.gather(1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand(*index.shape, *t.shape[2:]))


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompts: list[list[int]],
    config: GenerationConfig,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    prefill_chunk: int = 512,
    num_return_sequences: int = 1,
) -> list[list[Completion]]:
    """For each prompt its ``num_return_sequences`` best hypotheses, best first (``score`` is transformers'
    ``sequences_scores``). ``config.stop_token_ids`` end a beam like EOS; EOS is ignored with ``ignore_eos``."""
    prompts = check_prompts(prompts, model.config.vocab_size, model.config.max_seq_len)
    _check_options(config, num_return_sequences, pad_token_id, model.config.vocab_size)
    search = _Search(model, prompts, config, frozenset(eos_token_ids), pad_token_id, prefill_chunk)
    search.run()
    return search.results(num_return_sequences)


def _check_options(config: GenerationConfig, num_return_sequences: int, pad_token_id: int, vocab: int) -> None:
    beams = config.num_beams
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {beams!r}")
    n = num_return_sequences
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= beams:
        raise ValueError(f"num_return_sequences must be an integer in [1, num_beams={beams}], got {n!r}")
    if not config.sampling.greedy:
        raise ValueError("beam search is deterministic: drop the sampling options (temperature/top_k/top_p/min_p/seed)")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be in [0, vocab_size={vocab}), got {pad_token_id!r}")


class _Search:
    """The state of one ``beam_search`` call: the cache, and the running beams and finished pool of every prompt."""

    def __init__(self, model: Transformer, prompts: list[list[int]], config: GenerationConfig,
                 eos_token_ids: frozenset[int], pad_token_id: int, prefill_chunk: int) -> None:
        self.model, self.prompts, self.config = model, prompts, config
        self.pad_token_id, self.prefill_chunk = pad_token_id, prefill_chunk
        self.nb = config.num_beams
        param = next(model.parameters())
        self.device = param.device
        vocab = model.config.vocab_size
        stop = set(config.stop_token_ids) | (set() if config.ignore_eos else set(eos_token_ids))
        self.stop = torch.tensor(sorted(stop), dtype=torch.long, device=self.device)
        self.k = min(max(2, 1 + len(stop)) * self.nb, self.nb * vocab)  # candidates kept per prompt
        cfg = model.config
        longest = max(len(p) for p in prompts)
        self.cache = KVCache(cfg, len(prompts) * self.nb, min(cfg.max_seq_len, longest + config.max_new_tokens),
                             param.dtype, self.device, chunk_size=prefill_chunk)
        # tokens the cache can still take after the prompt, +1: the last token is never fed back
        self.budget = min(config.max_new_tokens, self.cache.max_len - longest + 1)
        self.running = Beams.empty(len(prompts), self.nb, self.budget, 0.0, self.device)
        self.running.scores[:, 1:] = NEG  # only beam 0 is live at first
        self.pool = Beams.empty(len(prompts), self.nb, self.budget, NEG, self.device)
        self.penalty = config.sampling.repetition_penalty
        self.history = TokenHistory(self.cache.n_slots, vocab, self.device)  # the engine's: repetition penalty
        for slot in range(self.cache.n_slots):
            self.history.start(slot, prompts[slot // self.nb], config.sampling)

    def slots(self, prompts: list[int]) -> list[int]:
        """Cache slots (= beam rows) of ``prompts``: prompt i beam j lives in slot i·num_beams + j."""
        return [i * self.nb + j for i in prompts for j in range(self.nb)]

    def prefill(self) -> Tensor:
        """Run every prompt once, copy its slot to its other beams; logits (P·nb, vocab)."""
        firsts = [i * self.nb for i in range(len(self.prompts))]
        logits = prefill(self.model, self.cache, self.prompts, firsts, self.pad_token_id, self.prefill_chunk)
        for s in firsts:
            if self.nb > 1:
                self.cache.copy_slot(s, range(s + 1, s + self.nb))
        return logits.repeat_interleave(self.nb, 0)

    def run(self) -> None:
        active = list(range(len(self.prompts)))
        logits = self.prefill()
        for t in range(self.budget):  # t tokens generated so far
            rows = torch.tensor(active, device=self.device)
            origin, done = self.step(rows, logits, t)
            still = [i for i, d in enumerate(done.tolist()) if not d]
            if not still:
                return
            self.follow([active[i] for i in still], origin[still], t)
            active = [active[i] for i in still]
            tokens = self.running.tokens[active, :, t].reshape(-1, 1)  # (A·nb, 1)
            plan = self.cache.begin(self.slots(active), 1)
            logits = self.model.forward_planned(tokens, plan, self.cache).logits[:, -1]

    def step(self, rows: Tensor, logits: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """One beam step for prompts ``rows`` (A,) given their beams' logits (A·nb, vocab).

        Returns, per prompt, the beam each new running beam continues (A, nb) and whether it is done (A,)."""
        logp = torch.log_softmax(logits.float(), -1)  # (A·nb, V)
        scored = logp
        seen, _ = self.history.rows(torch.tensor(self.slots(rows.tolist()), device=self.device))
        if seen is not None:
            scored = apply_repetition_penalty(logp, seen, torch.tensor([self.penalty], device=self.device))
        running = self.running.rows(rows)
        cand, src = self.candidates(running, logp, scored, t)
        running, origin = self.next_running(cand, src)
        pool = self.merge_finished(self.pool.rows(rows), cand, t)
        done = self.done(running, pool, cand, t)
        self.running.set_rows(rows, running)
        self.pool.set_rows(rows, pool)
        return origin, done

    def candidates(self, running: Beams, logp: Tensor, scored: Tensor, t: int) -> tuple[Beams, Tensor]:
        """The k best continuations per prompt (A, k) and the beam each extends (A, k)."""
        a, nb = running.scores.shape
        vocab = logp.shape[-1]
        total = (scored.view(a, nb, vocab) + running.scores[:, :, None]).view(a, nb * vocab)
        scores, flat = total.topk(self.k)  # (A, k), best first
        src, tok = flat // vocab, flat % vocab
        cand = running.gather(src)
        cand.scores = scores
        cand.tokens[:, :, t] = tok
        cand.logprobs[:, :, t] = logp.view(a, nb * vocab).gather(1, flat)
        cand.lengths = torch.full_like(cand.lengths, t + 1)
        cand.stopped = torch.isin(tok, self.stop)
        cand.ended = cand.stopped | (t + 1 >= self.budget)
        return cand, src

    def next_running(self, cand: Beams, src: Tensor) -> tuple[Beams, Tensor]:
        """The num_beams best candidates that go on; (beams (A, nb), their source beams (A, nb))."""
        alive = cand.scores + cand.ended.to(torch.float32) * NEG
        pick = alive.topk(self.nb).indices
        running = cand.gather(pick)
        running.scores = alive.gather(1, pick)
        return running, src.gather(1, pick)

    def merge_finished(self, pool: Beams, cand: Beams, t: int) -> Beams:
        """Candidates among the best num_beams that ended join the pool, which keeps its num_beams best."""
        just = cand.ended.clone()
        just[:, self.nb:] = False
        final = cand.scores / ((t + 1) ** self.config.length_penalty)  # t + 1 generated tokens
        final = final + (~just) * NEG
        merged = pool.cat(replace(cand, scores=final, ended=just))
        return merged.gather(merged.scores.topk(self.nb).indices)

    def done(self, running: Beams, pool: Beams, cand: Beams, t: int) -> Tensor:
        """(A,) bool: the pool can no longer change (budget spent, early stop, or no beam can improve it)."""
        lp, early = self.config.length_penalty, self.config.early_stopping
        length = self.budget if early == "never" and lp > 0 else t + 1
        best = running.scores[:, :1] / (length**lp)  # (A, 1) best running beam
        worst = torch.where(pool.ended, pool.scores.min(1, keepdim=True).values, NEG)  # (A, nb)
        improvable = (best > worst).any(1)
        full = pool.ended.all(1) & (early is True)
        return ~improvable | full | cand.ended.all(1)

    def follow(self, prompts: list[int], origin: Tensor, t: int) -> None:
        """Slot i·nb + j takes the cache (and seen tokens) of the beam it continues, i·nb + origin[i, j]."""
        index = torch.arange(self.cache.n_slots, device=self.device)
        base = torch.tensor(prompts, device=self.device)[:, None] * self.nb  # (A', 1)
        slots = (base + torch.arange(self.nb, device=self.device)).view(-1)
        index[slots] = (base + origin).view(-1)
        if not torch.equal(index[slots], slots):
            self.cache.reorder(index)
            self.history.reorder(index)
        self.history.record(slots, self.running.tokens[prompts, :, t].reshape(-1))  # the token each beam took

    def results(self, n: int) -> list[list[Completion]]:
        """The ``n`` best finished hypotheses of each prompt (the pool is kept sorted, best first)."""
        return [[_completion(self.pool, i, j) for j in range(n)] for i in range(len(self.prompts))]


def _completion(pool: Beams, i: int, j: int) -> Completion:
    length = int(pool.lengths[i, j])
    return Completion(pool.tokens[i, j, :length].tolist(), pool.logprobs[i, j, :length].tolist(),
                      "stop" if bool(pool.stopped[i, j]) else "length", score=float(pool.scores[i, j]))
