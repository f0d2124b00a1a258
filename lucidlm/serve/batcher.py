"""Continuous batching: requests join the running decode batch between steps.

    submit ─▶ waiting (bounded FIFO) ─free slot─▶ prefill (new rows only) ─┐
                                                                           ▼
    every iteration: sample one token for each running row ─▶ emit it ─▶ finished or cancelled rows
                     leave (their slots are free at once) ─▶ one decode forward for all the others

The engine (``generate/engine.py``) runs a fixed batch from first token to last; a server cannot wait
for the slowest request before starting the next, so here the batch changes at every step (Orca,
Yu et al. 2022: iteration-level scheduling). Each running sequence owns one KV-cache slot; the
cache keeps per-slot lengths and masks, so rows at different positions decode in one forward.

The batcher runs in its own thread (torch releases the GIL inside its kernels, so the HTTP event
loop stays responsive) and hands every token to the sequence's ``sink`` as a ``TokenEvent``; the
server turns those into server-sent events. A row's log-probabilities and text come from the forward
that produced its logits, exactly as ``lm.stream`` does; so does its probe score under the "predictive"
alignment. Under "own" a token is scored by the decode forward it is fed to, so its event waits for
that forward (one step of latency), and a finished row is fed its last token once more (logits
unused) before its slot is freed. The slot has the cell for it: ``submit`` keeps prompt +
max_new_tokens within max_len, and the first new token comes from the prefill without a cell of its
own. (A row ending because its slot was full could not be fed: its last score would be None.)

One request must never end another's: a failure that belongs to one row — its prefill, its sampling options
(a BatchSampling that cannot be built or processed), logits or a probe score that are not finite (NaN weights,
a temperature that overflows), its text — fails that row alone with an ErrorEvent, and the batch goes on
with the others, whose tokens are what they would have been without it (sampling is row by row; a failed row
is dropped before anything is drawn). Only a failure of the shared decode forward ends every row.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from ..api import LM
from ..generate.engine import Engine, split_output
from ..generate.generation_config import GenerationConfig
from ..generate.sampling import BatchSampling
from ..generate.text import TextAssembler
from ..generate.text_generation import engine_for
from ..model.kv_cache import KVCache

log = logging.getLogger("lucidlm.serve")


@dataclass
class TokenEvent:
    """One decoded token of one sequence."""

    token_id: int
    text: str  # the text this token makes visible ("" while a character or a stop string is pending)
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely tokens at this step
    score: float | None = None  # the probe's hallucination score, when a probe is loaded
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event


@dataclass
class ErrorEvent:
    """The sequence ended because of a server-side failure (the stream is closed with an error)."""

    message: str


Event = TokenEvent | ErrorEvent


class QueueFull(Exception):
    """The waiting queue is full: the server answers 429."""


class Draining(Exception):
    """The server is shutting down and takes no new requests: the server answers 503."""


class Sequence:
    """One choice of one request: a prompt, its options, and where its tokens go."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], config: GenerationConfig, sink: Callable[[Event], None], *,
                 top_logprobs: int = 0, sample_index: int = 0) -> None:
        self.prompt = prompt
        self.config = config
        self.sink = sink
        self.top_logprobs = top_logprobs
        self.sample_index = sample_index  # choice j of a seeded request samples with seed + j
        self.cancelled = False
        self.generated: list[int] = []
        self.submitted = time.perf_counter()
        self.uid = next(Sequence._ids)  # slots are reused; the sampler cache keys on sequences

    def cancel(self) -> None:
        """The client went away: the batcher drops the sequence before its next step."""
        self.cancelled = True


class _Row:
    """A running sequence: its slot, sampler state and text assembler."""

    def __init__(self, seq: Sequence, slot: int, lm: LM, device: torch.device) -> None:
        self.seq, self.slot = seq, slot
        params = seq.config.sampling
        self.generator = None
        if not params.greedy and params.seed is not None:
            self.generator = torch.Generator(device).manual_seed(params.seed + seq.sample_index)
        self.text = TextAssembler(lm.tokenizer, seq.config.stop) if lm.tokenizer is not None else None
        self.logits: torch.Tensor | None = None  # (vocab,) the distribution of the next token
        # the probe's score from the last forward: "predictive", of the next token (decoded by it);
        # "own", of the token fed to it. Taken (reset to None) by the event it goes to.
        self.score: float | None = None


class ContinuousBatcher:
    def __init__(self, lm: LM, *, max_batch: int = 32, max_queue: int = 256, max_len: int | None = None,
                 prefill_chunk: int = 512) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        cfg = lm.model.config
        self.lm = lm
        self.max_len = min(cfg.max_seq_len, max_len or cfg.max_seq_len)
        self.engine: Engine = engine_for(lm, prefill_chunk)
        self.cache = KVCache(cfg, max_batch, self.max_len, lm.dtype, lm.device, chunk_size=prefill_chunk)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab = cfg.vocab_size
        self.probe_layers = [lm.probe.config.layer] if lm.probe is not None else []
        self.own = lm.probe is not None and lm.probe.config.alignment == "own"  # see the module docstring
        self.free = list(range(max_batch))  # a heap: the lowest free slot first keeps the running slots a
        # contiguous range more often, and the cache then reads them as views instead of gathering
        self.rows: dict[int, _Row] = {}  # slot -> running row
        self.waiting: deque[list[Sequence]] = deque()  # whole requests (all their choices start together)
        self.seen: torch.Tensor | None = None  # (slots, vocab) bool: repetition penalty (prompt + output)
        self.counts: torch.Tensor | None = None  # (slots, vocab) int: presence/frequency penalties (output)
        self._sampling: tuple[tuple[int, ...], BatchSampling] | None = None  # (sequence uids, sampler)
        self._wake = threading.Condition()
        self._stop = False
        self._abort = False  # set by abort_all, handled by the loop
        self.accepting = True
        self.steps = 0  # decode forwards run (for stats and tests)
        self.cancelled = 0  # sequences dropped because their client went away
        self.failed = 0  # sequences ended by a failure of their own (the others went on)
        self.thread = threading.Thread(target=self._loop, name="lucidlm-batcher", daemon=True)

    # --- the outside: submit, cancel, stop ------------------------------------------------------------
    def start(self) -> ContinuousBatcher:
        self.thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue one group of sequences that start together (a prompt's ``n`` choices)."""
        self.submit_request([seqs])

    def submit_request(self, groups: list[list[Sequence]]) -> None:
        """Queue one request's groups (one per prompt) in order. Raises QueueFull or Draining at once, for the
        whole request: the bound counts load (groups already waiting), not the size of the request itself."""
        for seqs in groups:
            for s in seqs:
                need = len(s.prompt) + s.config.max_new_tokens
                if need > self.max_len:
                    raise ValueError(f"prompt ({len(s.prompt)} tokens) + max_new_tokens "
                                     f"({s.config.max_new_tokens}) exceed the context of {self.max_len} tokens")
            if len(seqs) > self.max_batch:
                raise ValueError(f"{len(seqs)} choices exceed the server's batch of {self.max_batch}")
        with self._wake:
            if not self.accepting:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")
            self.waiting.extend(groups)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        return {"running": len(self.rows), "waiting": sum(len(r) for r in self.waiting),
                "free_slots": len(self.free), "max_batch": self.max_batch, "decode_steps": self.steps,
                "cancelled": self.cancelled, "failed": self.failed}

    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def stop_accepting(self) -> None:
        with self._wake:
            self.accepting = False

    def abort_all(self) -> None:
        """End every running and waiting sequence now with finish_reason "abort" (shutdown deadline)."""
        with self._wake:
            self._abort = True
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --- the loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._abort and not self.rows and not self.waiting:
                    self._wake.wait()
                if self._stop:
                    break
                abort, self._abort = self._abort, False
            if abort:
                self._end_everything(partial(TokenEvent, -1, "", 0.0, finish_reason="abort"))
                continue
            try:
                with torch.inference_mode():
                    self.iteration()
            except Exception as e:  # never leave a stream hanging: fail what is running, keep serving
                log.exception("batcher step failed")
                message = f"generation failed: {type(e).__name__}: {e}"
                self._end_everything(partial(ErrorEvent, message))
        self._end_everything(partial(ErrorEvent, "the server stopped"))

    def iteration(self) -> None:
        """One scheduling step: drop cancelled rows, admit and prefill new ones, sample, decode."""
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if not self.rows:
            return
        rows, tokens, logprobs, top = self._sample(list(self.rows.values()))
        events = [self._row_event(*a) for a in zip(rows, tokens.tolist(), logprobs.tolist(), top)]
        kept = [i for i, e in enumerate(events) if e is not None]
        if len(kept) < len(rows):
            rows, events, tokens = [rows[i] for i in kept], [events[i] for i in kept], tokens[kept]
        # Which forward scores a token: "predictive", the one that decoded it (already run: emit now);
        # "own", the one it is fed to (the decode below: emit after it, and feed rows that just
        # finished once more so that their last token is scored too).
        if not self.own:
            self._emit(rows, events)
        fed = [i for i, (row, e) in enumerate(zip(rows, events)) if self.rows.get(row.slot) is row
               and (e.finish_reason is None or (self.own and self.cache.lengths[row.slot] < self.cache.max_len))]
        if fed:
            self._decode([rows[i] for i in fed], tokens[fed])
        if self.own:
            self._emit(rows, events)

    def _drop_cancelled(self) -> None:
        for slot in [s for s, r in self.rows.items() if r.seq.cancelled]:
            self._release(slot)
            self.cancelled += 1
        with self._wake:
            kept = deque(req for req in self.waiting if not all(s.cancelled for s in req))
            self.cancelled += sum(len(req) for req in self.waiting) - sum(len(req) for req in kept)
            self.waiting = kept

    def _admit(self) -> list[_Row]:
        """Move whole requests from the queue into free slots, first come first served."""
        admitted = []
        with self._wake:
            while self.waiting and len(self.waiting[0]) <= len(self.free):
                for seq in self.waiting.popleft():
                    if seq.cancelled:
                        continue
                    slot = heapq.heappop(self.free)
                    try:
                        row = _Row(seq, slot, self.lm, self.lm.device)
                    except Exception as e:  # its options (a seed, stop strings): this sequence's problem
                        heapq.heappush(self.free, slot)
                        self._fail_sequence(seq, f"cannot start: {type(e).__name__}: {e}")
                        continue
                    self.rows[slot] = row
                    admitted.append(row)
        return admitted

    def _prefill(self, rows: list[_Row]) -> None:
        """Run the new prompts through the model into their slots. Prompts share a left-padded forward
        only while the padding still leaves each its token budget (padding takes cache cells). A group
        whose forward fails is retried row by row, so that only the rows at fault fail."""
        self.cache.reset([r.slot for r in rows])
        for group in _padding_groups(rows, self.max_len):
            try:
                self._prefill_group(group)
            except Exception:
                log.exception("prefill failed for %d sequences; retrying them one by one", len(group))
                for r in group:
                    self.cache.reset([r.slot])
                    try:
                        self._prefill_group([r])
                    except Exception as e:
                        self._fail(r, f"prefill failed: {type(e).__name__}: {e}")

    def _prefill_group(self, group: list[_Row]) -> None:
        prompts, slots = [r.seq.prompt for r in group], [r.slot for r in group]
        logits, hidden = self.engine.prefill(self.cache, prompts, slots, self.probe_layers)
        scores = self._scores(hidden) if not self.own else None  # "own": the prompt's token, not scored
        for i, r in enumerate(group):
            r.logits, r.score = logits[i], None if scores is None else scores[i]
        self._mark_prompts(group)

    def _mark_prompts(self, rows: list[_Row]) -> None:
        if any(r.seq.config.sampling.repetition_penalty != 1.0 for r in rows):
            if self.seen is None:
                self.seen = torch.zeros(self.max_batch, self.vocab, dtype=torch.bool, device=self.lm.device)
        for r in rows:
            if self.seen is not None:
                self.seen[r.slot] = False
                self.seen[r.slot, torch.tensor(r.seq.prompt, device=self.lm.device)] = True
            if self.counts is not None:
                self.counts[r.slot] = 0
        if self.counts is None and any(r.seq.config.sampling.counts_tokens for r in rows):
            self.counts = torch.zeros(self.max_batch, self.vocab, dtype=torch.int32, device=self.lm.device)

    def _sample(self, rows: list[_Row]) -> tuple[list[_Row], torch.Tensor, torch.Tensor, list[list[tuple[int, float]]]]:
        """The rows that could be sampled, each one's next token, its log-probability under the model and
        the top alternatives. A row whose options cannot be applied, or whose distribution is not finite, is
        failed before anything is drawn, and the others are sampled without it."""
        logits = torch.stack([r.logits for r in rows]).float()  # (rows, vocab)
        slot_t = torch.tensor([r.slot for r in rows], device=logits.device)
        seen = self.seen[slot_t] if self.seen is not None else None
        counts = self.counts[slot_t] if self.counts is not None else None
        sampling, processed = None, None
        try:
            if not all(r.seq.config.sampling.plain_greedy for r in rows):
                sampling = self._sampler(rows)
                processed = sampling.process(logits, seen, counts)
        except Exception:
            failed = self._culprits(rows, logits, seen, counts)
            if not failed:  # no row fails alone: not one request's fault
                raise
        else:
            failed = _non_finite(logits, processed)
        if failed:
            for i, message in failed.items():
                self._fail(rows[i], message)
            rest = [r for i, r in enumerate(rows) if i not in failed]
            if not rest:
                return [], slot_t[:0], logits.new_empty(0), []
            return self._sample(rest)
        tokens = logits.argmax(-1) if sampling is None else sampling.sample(processed, [r.generator for r in rows])
        logp = torch.log_softmax(logits, -1)
        logprobs = logp.gather(-1, tokens[:, None])[:, 0]
        k = max(r.seq.top_logprobs for r in rows)
        top: list[list[tuple[int, float]]] = [[] for _ in rows]
        if k:
            values, ids = logp.topk(k, -1)
            for i, r in enumerate(rows):
                n = r.seq.top_logprobs
                top[i] = list(zip(ids[i, :n].tolist(), values[i, :n].tolist()))
        if self.seen is not None:
            self.seen[slot_t, tokens] = True
        if self.counts is not None:
            self.counts[slot_t, tokens] += 1
        return rows, tokens, logprobs, top

    def _sampler(self, rows: list[_Row]) -> BatchSampling:
        """The rows' sampling parameters as tensors, rebuilt only when the batch's sequences change."""
        key = tuple(r.seq.uid for r in rows)
        if self._sampling is None or self._sampling[0] != key:
            self._sampling = (key, BatchSampling.from_params([r.seq.config.sampling for r in rows], self.lm.device))
        return self._sampling[1]

    def _culprits(self, rows: list[_Row], logits: torch.Tensor, seen: torch.Tensor | None,
                  counts: torch.Tensor | None) -> dict[int, str]:
        """After a batch's options failed: the rows whose options fail on their own, with why."""
        failed = {}
        for i, r in enumerate(rows):
            one = slice(i, i + 1)
            try:
                BatchSampling.from_params([r.seq.config.sampling], self.lm.device).process(
                    logits[one], None if seen is None else seen[one], None if counts is None else counts[one])
            except Exception as e:
                failed[i] = f"its sampling options cannot be applied: {type(e).__name__}: {e}"
        return failed

    def _event(self, row: _Row, tok: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent:
        """The row's new token (its text and finish reason; the score is set by ``_emit``)."""
        seq = row.seq
        seq.generated.append(tok)
        piece, reason = "", None
        if row.text is not None:
            piece = row.text.push(tok)
            if row.text.stopped:
                reason = "stop"
        if reason is None:
            reason = self.engine.finish_reason(tok, seq.generated, seq.config, self.cache.lengths[row.slot],
                                                self.cache.max_len)
        if reason is not None and row.text is not None:
            piece += row.text.finish()
        return TokenEvent(tok, piece, logprob, top, finish_reason=reason)

    def _row_event(self, row: _Row, tok: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent | None:
        try:
            return self._event(row, tok, logprob, top)
        except Exception as e:  # its text (the tokenizer, its stop strings)
            self._fail(row, f"{type(e).__name__}: {e}")
            return None

    def _emit(self, rows: list[_Row], events: list[TokenEvent]) -> None:
        """Hand each row's event, with the row's score, to its sequence; finished rows free their slot."""
        for row, event in zip(rows, events):
            event.score, row.score = row.score, None
            if event.score is not None and not math.isfinite(event.score):
                self._fail(row, "the probe's score is not finite (NaN or inf): is the probe or the checkpoint broken?")
                continue
            row.seq.sink(event)
            if event.finish_reason is not None:
                self._release(row.slot)

    def _fail(self, row: _Row, message: str) -> None:
        """End one running sequence with an error; its slot is free at once."""
        self._release(row.slot)
        self._fail_sequence(row.seq, message)

    def _fail_sequence(self, seq: Sequence, message: str) -> None:
        log.warning("sequence %d failed alone (the batch goes on): %s", seq.uid, message)
        self.failed += 1
        if not seq.cancelled:
            seq.sink(ErrorEvent(f"generation failed: {message}"))

    def _decode(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """One forward for every fed row: their next logits (and probe scores)."""
        out = self.engine.decode(self.cache, tokens[:, None], [r.slot for r in rows], self.probe_layers)
        logits, hidden = split_output(out)
        scores = self._scores(hidden)
        for i, r in enumerate(rows):
            r.logits, r.score = logits[i, -1], None if scores is None else scores[i]
        self.steps += 1

    def _scores(self, hidden: dict[int, torch.Tensor]) -> list[float] | None:
        if not self.probe_layers:
            return None
        return self.lm.probe.head.scores(hidden[self.probe_layers[0]][:, -1]).tolist()

    def _release(self, slot: int) -> None:
        self.rows.pop(slot, None)
        heapq.heappush(self.free, slot)
        self.cache.reset([slot])

    def _end_everything(self, event: Callable[[], Event]) -> None:
        with self._wake:
            waiting = [s for req in self.waiting for s in req]
            self.waiting.clear()
        for seq in [r.seq for r in self.rows.values()] + waiting:
            if not seq.cancelled:
                seq.sink(event())
        for slot in list(self.rows):
            self._release(slot)
        self._sampling = None


def _non_finite(logits: torch.Tensor, processed: torch.Tensor | None) -> dict[int, str]:
    """Rows that cannot be sampled, with why: the model's logits must all be finite (NaN or inf ones come from a
    broken checkpoint), and after the row's options the largest must be finite (no NaN or +inf, not all -inf)."""
    model_ok = torch.isfinite(logits).all(-1)
    ok = model_ok if processed is None else model_ok & torch.isfinite(processed.amax(-1))
    if bool(ok.all()):  # the common case: one check, one sync
        return {}
    return {i: "the model's logits are not finite (NaN or inf): is the checkpoint broken?" if not m else
            "its sampling options make the distribution non-finite (temperature, penalties or logit_bias)"
            for i, (m, good) in enumerate(zip(model_ok.tolist(), ok.tolist())) if not good}


def _padding_groups(rows: list[_Row], max_len: int) -> list[list[_Row]]:
    """Split new rows into prefill groups, longest prompt first, so that left padding up to a group's
    longest prompt never eats into any row's token budget."""
    groups: list[list[_Row]] = []
    for r in sorted(rows, key=lambda r: -len(r.seq.prompt)):
        if groups and len(groups[-1][0].seq.prompt) + r.seq.config.max_new_tokens <= max_len:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups
