"""Continuous batching for the server: the engine (generate/engine.py) driven from its own thread.

    submit_request ─▶ bounded queue (429 when full, 503 while draining) ─▶ Engine.add
    thread: while there is work: Engine.step()  (admit, prefill a chunk, sample, emit, decode)

The engine does the scheduling (requests join and leave the running batch between steps), the sampling, the
text and the probe scores — the same loop ``lm.generate`` runs. What is the server's own: the thread (torch
releases the GIL inside its kernels, so the HTTP event loop stays responsive), the bound on waiting requests,
draining on shutdown, aborting on a deadline, and keeping serving when a step fails: a failure of the shared
decode forward ends the rows it ran, and the next request starts afresh.
"""

from __future__ import annotations

import logging
import threading
from functools import partial

from ..api import LM
from ..generate.compiled_steps import cache_dir
from ..generate.events import ErrorEvent, Event, TokenEvent
from ..generate.sequence import Sequence

__all__ = ["ContinuousBatcher", "Draining", "ErrorEvent", "Event", "QueueFull", "Sequence", "TokenEvent"]

log = logging.getLogger("lucidlm.serve")

PREFIX_CACHE_BYTES = 256 * 2**20  # K/V of shared prompt heads kept for later requests


class QueueFull(Exception):
    """The waiting queue is full: the server answers 429."""


class Draining(Exception):
    """The server is shutting down and takes no new requests: the server answers 503."""


class ContinuousBatcher:
    def __init__(self, lm: LM, *, max_batch: int = 32, max_queue: int = 256, max_len: int | None = None,
                 prefill_chunk: int = 256, prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        cfg = lm.model.config
        gen = lm.generator(prefill_chunk)
        self.lm = lm
        self.max_len = min(cfg.max_seq_len, max_len or cfg.max_seq_len)
        self.engine = gen.engine(max_batch, self.max_len, prefix_cache_bytes=prefix_cache_bytes,
                                 isolate_failures=True)
        self.max_batch, self.max_queue = max_batch, max_queue
        self._wake = threading.Condition()
        self._stop = False
        self._abort = False  # set by abort_all, handled by the loop
        self.accepting = True
        self.thread = threading.Thread(target=self._loop, name="lucidlm-batcher", daemon=True)

    # --- the outside: submit, cancel, stop ------------------------------------------------------------
    def start(self) -> ContinuousBatcher:
        loaded = self.engine.preload_compiled()  # before serving: no request waits on loading a step
        if loaded:
            log.info("loaded %d compiled decode step(s) from %s", loaded, cache_dir())
        self.thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue one group of sequences that start together (a prompt's ``n`` choices)."""
        self.submit_request([seqs])

    def submit_request(self, groups: list[list[Sequence]]) -> None:
        """Queue one request's groups (one per prompt) in order. Raises ValueError for a sequence that cannot run,
        QueueFull or Draining at once, for the whole request: the bound counts load (groups already waiting),
        not the size of the request itself."""
        for seqs in groups:
            if len(seqs) > self.max_batch:
                raise ValueError(f"{len(seqs)} choices exceed the server's batch of {self.max_batch}")
            for s in seqs:
                self.engine.check(s)
        with self._wake:
            if not self.accepting:
                raise Draining("the server is shutting down")
            if len(self.engine.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.engine.waiting)} requests are waiting (the queue holds {self.max_queue})")
            self.engine.add(groups)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    @property
    def steps(self) -> int:
        return self.engine.steps  # decode forwards run

    @property
    def failed(self) -> int:
        return self.engine.failed  # sequences ended by a failure of their own

    @property
    def cancelled(self) -> int:
        return self.engine.cancelled  # sequences dropped because their client went away

    def idle(self) -> bool:
        return not self.engine.has_work()

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
                while not self._stop and not self._abort and not self.engine.has_work():
                    self._wake.wait()
                if self._stop:
                    break
                abort, self._abort = self._abort, False
            if abort:
                self.engine.end_all(partial(TokenEvent, -1, "", 0.0, finish_reason="abort"))
                continue
            try:
                self.iteration()
            except Exception as e:  # never leave a stream hanging: fail what is running, keep serving
                log.exception("batcher step failed")
                self.engine.end_all(partial(ErrorEvent, f"generation failed: {type(e).__name__}: {e}"))
        self.engine.end_all(partial(ErrorEvent, "the server stopped"))

    def iteration(self) -> None:
        """One engine step (the loop's; tests also drive the batcher without its thread)."""
        self.engine.step()
