"""The inference engine: one loop that every client drives — ``lm.generate``/``lm.stream``/``lm.sample`` (one
call, synchronously: generate/offline.py) and the server (its batcher thread: serve/batcher.py).

    add(groups) ─▶ waiting (FIFO of whole requests) ─free slots─▶ prefill jobs (chunked, prefix cache)
    step():  drop cancelled ─▶ admit ─▶ prefill positions costing about one decode step (all, when none decode)
             ─▶ sample one token for every running row (per-row parameters, generators, penalties)
             ─▶ TokenEvent to the row's sink (text, stop strings, finish reason, logprobs, probe score)
             ─▶ finished rows free their slot ─▶ one decode forward for all the others

Prefill is compute-bound (many tokens, one pass over the weights); decode is memory-bound (every step streams
all weights for one token per row), so batching rows makes decode cheaper per token. Each running sequence owns
one KV-cache slot; the cache keeps per-slot lengths and masks, so rows at different positions decode in one
forward, and requests join and leave the batch between steps (iteration-level scheduling: Orca, Yu et al.
2022). A long prompt is prefilled a little per step, about a decode step's worth, so running streams wait about
one step for it instead of its whole prefill (chunked prefill).

The probe. Under the "predictive" alignment a token is scored by the forward that decoded it (its event goes out
at once). Under "own" a token is scored by the forward it is fed to, so its event waits for that forward, and a
finished row is fed its last token once more (logits unused) before its slot is freed. The slot has the cell for
it: the prefill produces the first new token without writing a cell for it, so prompt + max_new_tokens cells hold
every token once fed. (A row that ended because its slot was full cannot be fed: its last score is None.)

Failures (``isolate_failures``, the server): one request must never end another's. A failure that belongs to one
row — its prefill, its sampling options, logits or a probe score that are not finite, its text — fails that row
alone with an ErrorEvent, and the others go on with the tokens they would have had without it. Only a failure of
the shared decode forward ends every row (the caller's concern). The library raises instead.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.kv_cache import STATIC_BUCKET, KVCache
from ..model.transformer import ModelOutput, Transformer
from ..tokenizer import Tokenizer
from .compiled_steps import CompiledStepRefused, CompiledSteps, StepShape, as_mode
from .events import ErrorEvent, Event, TokenEvent
from .generation_config import GenerationConfig
from .prefill import Prefill
from .prefix_cache import PrefixCache
from .sample_step import SampleStep
from .sampling import row_generator
from .sequence import Sequence
from .text import TextAssembler
from .token_history import TokenHistory

log = logging.getLogger("lucidlm.engine")

MIN_PREFILL_BUDGET = 16  # token positions prefilled per step while rows decode, before any step was timed
PREFILL_SHARE = 0.75  # a long prompt's chunk per step costs this share of a decode step (ITL <= ~2x while it runs)
SHORT_PROMPT = 256  # prompts of at most this many positions are prefilled whole, even while rows decode
STATIC_LEN_STEP = STATIC_BUCKET  # compiled decode: cache lengths are rounded up to a multiple of this


@dataclass(frozen=True)
class ProbeScoring:
    """A hallucination probe as the engine sees it: a head on the residual stream after block ``layer``."""

    score: Callable[[torch.Tensor], torch.Tensor]  # hidden (rows, dim) -> scores (rows,)
    layer: int
    alignment: str  # "predictive": a token is scored from the state that decoded it; "own": from its own state


class _Row:
    """A running sequence: its slot, generator, text, and the next token's distribution."""

    def __init__(self, seq: Sequence, slot: int, tokenizer: Tokenizer | None, device: torch.device) -> None:
        self.seq, self.slot = seq, slot
        self.generator = row_generator(seq.config.sampling, seq.sample_index, device)
        self.text = TextAssembler(tokenizer, seq.config.stop) if tokenizer is not None else None
        self.logits: torch.Tensor | None = None  # (vocab,) the distribution of the next token
        # the probe's score from the last forward: "predictive", of the next token (decoded by it); "own", of
        # the token fed to it. Taken (reset to None) by the event it goes to.
        self.score: float | None = None


@dataclass(eq=False)  # a job is itself: the scheduler finds and removes it by identity
class _Job:
    """Prompts being prefilled together: one leader per distinct prompt, whose slot its followers (the other
    choices of the same request) copy when the prefill is done."""

    prefill: Prefill
    leaders: list[_Row]
    followers: list[list[_Row]]
    starts: list[int]  # tokens each leader's slot held before (a cached prefix)

    def rows(self) -> list[_Row]:
        return [r for leader, fs in zip(self.leaders, self.followers) for r in [leader, *fs]]


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int,
        max_len: int,
        eos_token_ids: tuple[int, ...] | list[int] | frozenset[int] = (),
        pad_token_id: int = 0,
        tokenizer: Tokenizer | None = None,
        probe: ProbeScoring | None = None,
        prefill_chunk: int = 512,
        compile: bool | str = "off",
        prefix_cache_bytes: int = 0,
        isolate_failures: bool = True,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        cfg = model.config
        if cfg.positions == "alibi" and cfg.sliding_window is not None:
            raise ValueError("ALiBi with sliding-window ring caches is not supported")
        if cfg.positions == "relative_bias" and cfg.sliding_window is not None:
            raise ValueError("positions='relative_bias' with sliding-window ring caches is not supported")
        param = next(model.parameters())
        self.model, self.tokenizer, self.probe = model, tokenizer, probe
        self.eos_token_ids, self.pad_token_id = frozenset(eos_token_ids), pad_token_id
        self.max_batch, self.max_len, self.prefill_chunk = max_batch, max_len, prefill_chunk
        self.short_prompt = SHORT_PROMPT
        # decode steps run as one compiled graph over a static cache: "on" builds each shape before its first step
        # (loaded from disk, or compiled once per machine), "off" never (generate/compiled_steps.py)
        self.compile = as_mode(compile)
        self.device = param.device
        self.cache = KVCache(cfg, max_batch, max_len, param.dtype, self.device, chunk_size=prefill_chunk,
                             static=self.compile != "off")
        self.compiled = CompiledSteps.for_model(model) if self.compile != "off" else None
        self.compiled_steps = 0  # decode steps that ran compiled
        self.history = TokenHistory(max_batch, cfg.vocab_size, self.device)
        self.isolate = isolate_failures
        self.sample = SampleStep(self.history, self.device, isolate_failures)
        rings = any(cfg.is_sliding(i) for i in range(cfg.n_layers))
        rings = rings or cfg.attention == "linear"  # a recurrent state is no cells by position either
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes and not rings else None
        self.layers = (probe.layer,) if probe is not None else ()
        self.own = probe is not None and probe.alignment == "own"
        self.free = list(range(max_batch))  # a heap: the lowest free slot first keeps running slots contiguous
        self.running: dict[int, _Row] = {}  # slot -> row that samples next
        self.jobs: deque[_Job] = deque()
        self.waiting: deque[list[Sequence]] = deque()  # whole requests' groups (a group's choices start together)
        self.lock = threading.Lock()  # guards ``waiting``: the server adds from other threads
        self.clock = StepClock(self.device)
        self.steps = 0  # decode forwards run
        self.cancelled = 0  # sequences dropped because their client went away
        self.failed = 0  # sequences ended by a failure of their own (the others went on)

    # --- the outside ------------------------------------------------------------------------------------
    def preload_compiled(self) -> int:
        """Load every compiled step of this engine's shapes that is on disk already; how many. (A server calls it
        before serving, so no request waits on a load; shapes not on disk are still compiled on first use.)"""
        if self.compiled is None:
            return 0
        widths = sorted({1 << i for i in range(self.max_batch.bit_length()) if 1 << i <= self.max_batch}
                        | {self.max_batch})
        kv_lens = sorted({self.cache.static_kv_len(n) for n in range(1, self.max_len + 1, STATIC_BUCKET)}
                         | {self.cache.static_kv_len(self.max_len)})
        return self.compiled.preload([StepShape(self.max_batch, self.max_len, self.prefill_chunk, w, kv, self.layers)
                                      for w in widths for kv in kv_lens])

    def check(self, seq: Sequence, fit_budget: bool = True) -> None:
        """Raise ValueError, naming the problem, for a sequence this engine cannot run (before any compute)."""
        check_prompts([seq.prompt], self.model.config.vocab_size, self.max_len)
        if fit_budget and len(seq.prompt) + seq.config.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(seq.prompt)} tokens) + max_new_tokens ({seq.config.max_new_tokens}) "
                             f"exceed the context of {self.max_len} tokens")
        if seq.config.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has no tokenizer.json")

    def add(self, groups: list[list[Sequence]], fit_budget: bool = True) -> None:
        """Queue groups (each: the choices of one prompt, which start together). Checks everything first.
        ``fit_budget``: prompt + max_new_tokens must fit the context (else a row ends at the context, "length")."""
        for seqs in groups:
            if not seqs:
                raise ValueError("an empty group: a group is the choices of one prompt, at least one")
            if len(seqs) > self.max_batch:
                raise ValueError(f"{len(seqs)} choices exceed the engine's batch of {self.max_batch}")
            if any(list(s.prompt) != list(seqs[0].prompt) for s in seqs):  # they will share its prefill
                raise ValueError("the sequences of a group must share one prompt (they are one request's choices)")
            for s in seqs:
                self.check(s, fit_budget)
        with self.lock:
            self.waiting.extend(groups)

    def has_work(self) -> bool:
        return bool(self.running or self.jobs or self.waiting)

    def stats(self) -> dict[str, int]:
        prefix = self.prefix_cache
        return {"running": len(self.running), "prefilling": sum(len(j.rows()) for j in self.jobs),
                "waiting": sum(len(g) for g in self.waiting), "free_slots": len(self.free),
                "max_batch": self.max_batch, "decode_steps": self.steps, "cancelled": self.cancelled,
                "failed": self.failed, "prefix_hits": prefix.hits if prefix else 0,
                "prefix_tokens_saved": prefix.tokens_saved if prefix else 0,
                "compiled_steps": self.compiled_steps}

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop cancelled rows, admit, prefill (a chunk), sample, emit, decode."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self.running:
            self._sample_and_decode()

    def end_all(self, event: Callable[[], Event]) -> None:
        """End every running, prefilling and waiting sequence with ``event()`` (abort, shutdown, a failed step)."""
        with self.lock:
            waiting = [s for g in self.waiting for s in g]
            self.waiting.clear()
        rows = list(self.running.values()) + [r for j in self.jobs for r in j.rows()]
        for seq in [r.seq for r in rows] + waiting:
            if not seq.cancelled:
                seq.sink(event())
        for r in rows:
            self._release(r.slot)
        self.jobs.clear()

    # --- admission and prefill --------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for slot in [s for s, r in self.running.items() if r.seq.cancelled]:
            self._release(slot)
            self.cancelled += 1
        for job in [j for j in self.jobs if all(r.seq.cancelled for r in j.rows())]:
            self.jobs.remove(job)
            for r in job.rows():
                self._release(r.slot)
                self.cancelled += 1
        with self.lock:
            kept = deque(g for g in self.waiting if not all(s.cancelled for s in g))
            self.cancelled += sum(len(g) for g in self.waiting) - sum(len(g) for g in kept)
            self.waiting = kept

    def _admit(self) -> None:
        """Move whole groups from the queue into free slots, first come first served, and plan their prefill."""
        groups: list[list[_Row]] = []
        with self.lock:
            while self.waiting and len(self.waiting[0]) <= len(self.free):
                rows = [row for seq in self.waiting.popleft() if not seq.cancelled
                        for row in [self._start_row(seq)] if row is not None]
                if rows:
                    groups.append(rows)
        if groups:
            self._plan_prefill(groups)

    def _start_row(self, seq: Sequence) -> _Row | None:
        slot = heapq.heappop(self.free)
        try:
            return _Row(seq, slot, self.tokenizer, self.device)
        except Exception as e:  # its options (a seed, stop strings): this sequence's problem
            heapq.heappush(self.free, slot)
            if not self.isolate:
                raise
            self._fail_sequence(seq, f"cannot start: {type(e).__name__}: {e}")
            return None

    def _plan_prefill(self, groups: list[list[_Row]]) -> None:
        """One leader per group (its choices share the prompt); a cached prompt head goes into its slot; leaders
        are batched into left-padded jobs while the padding leaves each its token budget."""
        entries = []  # (leader, followers, start, rest of the prompt)
        for rows in groups:
            leader, prompt = rows[0], rows[0].seq.prompt
            start, rest = 0, prompt
            found = self.prefix_cache.match(prompt) if self.prefix_cache is not None else None
            if found is not None:
                cells, start = found
                self.cache.write_prefix(leader.slot, cells, start)
                rest = prompt[start:]
            else:
                self.cache.reset([leader.slot])
            entries.append((leader, rows[1:], start, rest))
        for job in _padding_groups(entries, self.max_len):
            self.jobs.append(self._job(job))

    def _job(self, entries: list[tuple]) -> _Job:
        prefill = Prefill([e[3] for e in entries], [e[0].slot for e in entries], self.pad_token_id,
                          self.prefill_chunk, self.device)
        return _Job(prefill, [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])

    def _prefill(self) -> None:
        """Chunked prefill. With no row decoding nothing waits: whole chunks until some row can decode. With rows
        decoding, short prompts (at most ``short_prompt`` positions) run whole: each costs a few decode steps at
        most, and joining the batch at once keeps it large (throughput, time to first token). A long prompt
        advances by a budget of positions that costs a share of one decode step (measured: ``StepClock``), so it
        delays running streams by less than a step per step, not by its whole prefill (Sarathi-Serve's stall-free
        batching, here as separate forwards)."""
        if not self.running:
            while self.jobs and not self.running:
                self._prefill_chunk(self.jobs[0], self.prefill_chunk)
            return
        for job in [j for j in self.jobs if j.prefill.positions <= self.short_prompt]:
            while job in self.jobs:
                self._prefill_chunk(job, self.prefill_chunk)
        budget = self.clock.prefill_budget(MIN_PREFILL_BUDGET, PREFILL_SHARE)
        while self.jobs and budget > 0:
            job = self.jobs[0]
            width = max(1, min(self.prefill_chunk, budget // len(job.leaders)))
            budget -= self._prefill_chunk(job, width) * len(job.leaders)

    def _prefill_chunk(self, job: _Job, width: int) -> int:
        """Run the job's next ``width`` positions at most; how many it ran."""
        before = job.prefill.cursor
        start = self.clock.start()
        try:
            out = job.prefill.run_chunk(self.model, self.cache, self.layers, width)
        except Exception as e:
            self.jobs.remove(job)
            if not self.isolate:
                raise
            self._retry_alone(job, e)
            return width
        ran = job.prefill.cursor - before
        self.clock.prefilled(start, ran * len(job.leaders))
        if job.prefill.done:
            self.jobs.remove(job)
            self._prefill_done(job, out)
        return ran

    def _retry_alone(self, job: _Job, error: Exception) -> None:
        """A job's forward failed: its prompts start over one job each, so that only the one at fault fails."""
        if len(job.leaders) == 1:
            for r in job.rows():
                self._fail(r, f"prefill failed: {type(error).__name__}: {error}")
            return
        log.exception("prefill failed for %d prompts; retrying them one by one", len(job.leaders))
        for leader, followers in reversed(list(zip(job.leaders, job.followers))):
            self.cache.reset([leader.slot])
            self.jobs.appendleft(self._job([(leader, followers, 0, leader.seq.prompt)]))

    def _prefill_done(self, job: _Job, out: ModelOutput) -> None:
        logits = out.logits[:, -1]
        scores = self._scores(out) if not self.own else None  # "own": the prompt's last token is not scored
        for i, (leader, followers) in enumerate(zip(job.leaders, job.followers)):
            if followers:
                self.cache.copy_slot(leader.slot, [f.slot for f in followers])
            self._store_prefix(leader, job.starts[i], job.prefill.pads[i])
            for r in [leader, *followers]:
                r.logits, r.score = logits[i], None if scores is None else scores[i]
                self.history.start(r.slot, r.seq.prompt, r.seq.config.sampling)
                self.running[r.slot] = r

    def _store_prefix(self, leader: _Row, start: int, pad: int) -> None:
        """Keep the leader's prompt head for later prompts, when its cells are one contiguous run."""
        cache, prompt = self.prefix_cache, leader.seq.prompt
        if cache is None or cache.storable(prompt) == 0 or cache.has(prompt) or (start and pad):
            return
        first = pad if start == 0 else 0  # left padding sits before a fresh prompt, after a cached head
        cache.store(prompt, self.cache.read_cells(leader.slot, first, cache.storable(prompt)))

    # --- one decode step --------------------------------------------------------------------------------
    def _sample_and_decode(self) -> None:
        rows = [self.running[s] for s in sorted(self.running)]
        sampled = self.sample(torch.stack([r.logits for r in rows]), [r.slot for r in rows],
                              [r.seq.config.sampling for r in rows], [r.generator for r in rows],
                              tuple(r.seq.uid for r in rows), [r.seq.top_logprobs for r in rows])
        for i, why in sampled.failed.items():
            self._fail(rows[i], why)
        rows = [rows[i] for i in sampled.index]
        events = [self._event(*a) for a in zip(rows, sampled.tokens.tolist(), sampled.logprobs.tolist(),
                                                sampled.top)]
        kept = [i for i, e in enumerate(events) if e is not None]
        rows, events, tokens = [rows[i] for i in kept], [events[i] for i in kept], sampled.tokens[kept]
        # Which forward scores a token: "predictive", the one that decoded it (already run: emit now); "own",
        # the one it is fed to (the decode below: emit after it, feeding rows that just finished once more).
        if not self.own:
            self._emit(rows, events)
        fed = [i for i, (row, e) in enumerate(zip(rows, events)) if self.running.get(row.slot) is row
               and (e.finish_reason is None or (self.own and self.cache.lengths[row.slot] < self.cache.max_len))]
        if fed:
            self._decode([rows[i] for i in fed], tokens[fed])
        if self.own:
            self._emit(rows, events)

    def _event(self, row: _Row, tok: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent | None:
        """The row's new token, its text and finish reason (the score is set by ``_emit``)."""
        try:
            seq = row.seq
            seq.generated.append(tok)
            piece, reason = "", None
            if row.text is not None:
                piece = row.text.push(tok)
                if row.text.stopped:
                    reason = "stop"
            if reason is None:
                reason = self.finish_reason(tok, seq.generated, seq.config, self.cache.lengths[row.slot])
            if reason is not None and row.text is not None:
                piece += row.text.finish()
            return TokenEvent(tok, piece, logprob, top, finish_reason=reason)
        except Exception as e:  # its text (the tokenizer, its stop strings)
            if not self.isolate:
                raise
            self._fail(row, f"{type(e).__name__}: {e}")
            return None

    def finish_reason(self, tok: int, generated: list[int], config: GenerationConfig, length: int) -> str | None:
        if (tok in self.eos_token_ids and not config.ignore_eos) or tok in config.stop_token_ids:
            return "stop"
        if len(generated) >= config.max_new_tokens or length >= self.cache.max_len:
            return "length"  # budget spent, or the context is full (this token cannot be fed back)
        return None

    def _emit(self, rows: list[_Row], events: list[TokenEvent]) -> None:
        """Hand each row's event, with the row's score, to its sequence; finished rows free their slot."""
        for row, event in zip(rows, events):
            event.score, row.score = row.score, None
            if event.score is not None and not math.isfinite(event.score) and self.isolate:
                self._fail(row, "the probe's score is not finite (NaN or inf): is the probe or the checkpoint broken?")
                continue
            row.seq.sink(event)
            if event.finish_reason is not None:
                self._release(row.slot)

    def _decode(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """One forward for every fed row: their next logits (and probe scores)."""
        start = self.clock.start()
        out = self._forward_one(tokens[:, None], [r.slot for r in rows])
        logits, scores = out.logits[:, -1], self._scores(out)  # scores: a sync, the step is done
        self.clock.decoded(start)
        for i, r in enumerate(rows):
            r.logits, r.score = logits[i], None if scores is None else scores[i]
        self.steps += 1

    def _forward_one(self, tokens: torch.Tensor, slots: list[int]) -> ModelOutput:
        """One decode forward: tokens (rows, 1) continue the sequences in ``slots``."""
        if self.compiled is None:
            return self._forward_eager(tokens, slots)
        # A compiled step is specialised to its shapes: run a power-of-two number of rows, filling up with free
        # slots (reset afterwards) and dropping their outputs, so the batch compiles for a handful of widths.
        rows = len(slots)
        width = 1 << (rows - 1).bit_length()
        spare = heapq.nsmallest(width - rows, self.free) if width - rows <= len(self.free) else []
        if width > rows and not spare:
            width = rows  # no free slots to fill with (prefills hold them): compile this width too
        kv_len = self.cache.static_kv_len(max(self.cache.lengths[s] for s in slots) + 1)
        shape = StepShape(self.max_batch, self.max_len, self.prefill_chunk, width, kv_len, self.layers)
        step = self.compiled.get(shape)
        if step is None:  # could not be compiled: this step runs eagerly, on its own rows
            return self._forward_eager(tokens, slots)
        if spare:
            slots = slots + spare
            tokens = torch.cat([tokens, tokens.new_full((len(spare), 1), self.pad_token_id)])
        plan = self.cache.begin(slots, 1)  # host-side bookkeeping stays out of the compiled graph
        try:
            out = step(tokens, plan, self.cache)
            self.compiled_steps += 1
        except CompiledStepRefused as e:
            self.compiled.refuse(shape, e)
            out = self.model.forward_planned(tokens, plan, self.cache, hidden_layers=self.layers, last_only=True)
        if not spare:
            return out
        self.cache.reset(spare)
        return ModelOutput(out.logits[:rows], {k: h[:rows] for k, h in out.hidden_states.items()})

    def _forward_eager(self, tokens: torch.Tensor, slots: list[int]) -> ModelOutput:
        plan = self.cache.begin(slots, 1)
        return self.model.forward_planned(tokens, plan, self.cache, hidden_layers=self.layers)

    def _scores(self, out: ModelOutput) -> list[float] | None:
        if self.probe is None:
            return None
        return self.probe.score(out.hidden_states[self.probe.layer][:, -1]).tolist()

    # --- ending rows ------------------------------------------------------------------------------------
    def _fail(self, row: _Row, message: str) -> None:
        """End one sequence with an error; its slot is free at once."""
        self._release(row.slot)
        self._fail_sequence(row.seq, message)

    def _fail_sequence(self, seq: Sequence, message: str) -> None:
        log.warning("sequence %d failed alone (the batch goes on): %s", seq.uid, message)
        self.failed += 1
        if not seq.cancelled:
            seq.sink(ErrorEvent(f"generation failed: {message}"))

    def _release(self, slot: int) -> None:
        if self.running.pop(slot, None) is None and slot in self.free:
            return
        heapq.heappush(self.free, slot)
        self.cache.reset([slot])


class StepClock:
    """Running averages of how long a decode step takes and how many prompt positions a second prefill runs, so
    the scheduler can size a prefill chunk to cost about one decode step."""

    def __init__(self, device: torch.device, smoothing: float = 0.2) -> None:
        self.device, self.smoothing = device, smoothing
        self.decode_seconds: float | None = None
        self.prefill_rate: float | None = None  # positions × rows per second

    def start(self) -> float:
        self._sync()
        return time.perf_counter()

    def decoded(self, start: float) -> None:
        self.decode_seconds = self._average(self.decode_seconds, self._since(start))

    def prefilled(self, start: float, positions: int) -> None:
        seconds = self._since(start)
        if seconds > 0 and positions > 0:
            self.prefill_rate = self._average(self.prefill_rate, positions / seconds)

    def prefill_budget(self, floor: int, share: float = 1.0) -> int:
        """Positions × rows that ``share`` of a decode step's time buys (``floor`` until both were measured)."""
        if self.decode_seconds is None or self.prefill_rate is None:
            return floor
        return max(floor, int(share * self.decode_seconds * self.prefill_rate))

    def _since(self, start: float) -> float:
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":  # kernels run asynchronously: time the work, not its launch
            torch.cuda.synchronize(self.device)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new


def check_prompts(prompts, vocab_size: int, max_len: int) -> list[list[int]]:
    """Token-id prompts as lists, each non-empty, in the vocabulary, leaving room for one new token."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts:
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size}): {bad[:5]}")
        if len(p) >= max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the context is {max_len}, which leaves no room "
                             "to generate")
        out.append(p)
    return out


def _padding_groups(entries: list[tuple], max_len: int) -> list[list[tuple]]:
    """Split leaders (leader, followers, start, rest) into prefill jobs, longest rest first, so that left padding up
    to a job's longest never eats into any row's token budget (what it could generate prefilled alone)."""
    jobs: list[list[tuple]] = []
    for e in sorted(entries, key=lambda e: -len(e[3])):
        leader, _, start, rest = e
        budget = min(leader.seq.config.max_new_tokens, max_len - start - len(rest))
        if jobs and start + len(jobs[-1][0][3]) + budget <= max_len:
            jobs[-1].append(e)
        else:
            jobs.append([e])
    return jobs
