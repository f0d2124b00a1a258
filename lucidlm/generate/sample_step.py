"""One sampling step for a batch whose rows may be different requests: the next token of every running row.

    logits (rows, vocab) ─▶ penalties from TokenHistory ─▶ BatchSampling processors (per-row parameters)
                         ─▶ argmax or a draw with the row's generator ─▶ token, its model log-probability, top-k

A row whose options cannot be applied, or whose distribution is not finite (NaN weights, a temperature that
overflows), is reported in ``failed`` and the others are sampled without it: sampling is row by row, so their
tokens are what they would have been alone. With ``isolate=False`` (the library, one caller) such a failure is
raised as it comes instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import BatchSampling, SamplingParams
from .token_history import TokenHistory


@dataclass
class Sampled:
    index: list[int]  # positions of the rows that were sampled (the others failed)
    tokens: torch.Tensor  # (sampled,)
    logprobs: torch.Tensor  # (sampled,) log p(token) under the model, before any processor
    top: list[list[tuple[int, float]]]  # per sampled row, its top_logprobs most likely (token, logprob)
    failed: dict[int, str] = field(default_factory=dict)  # position -> why


class SampleStep:
    def __init__(self, history: TokenHistory, device: torch.device, isolate: bool = True) -> None:
        self.history, self.device, self.isolate = history, device, isolate
        self._batch: tuple[tuple[int, ...], BatchSampling] | None = None  # (row keys, sampler) of the last step

    def __call__(self, logits: torch.Tensor, slots: list[int], params: list[SamplingParams],
                 generators: list[torch.Generator | None], keys: tuple[int, ...], top_k: list[int]) -> Sampled:
        """logits (rows, vocab) of the rows in cache ``slots``; ``keys`` identify the rows' sequences (the
        processors' tensors are rebuilt only when they change)."""
        index = list(range(len(slots)))
        failed: dict[int, str] = {}
        logits = logits.float()
        while True:
            slot_t = torch.tensor(_pick(slots, index), device=logits.device)
            rows_logits = logits[index] if len(index) < len(slots) else logits
            seen, counts = self.history.rows(slot_t)
            bad, tokens = self._draw(rows_logits, _pick(params, index), _pick(generators, index),
                                     tuple(_pick(keys, index)), seen, counts)
            if not bad:
                break
            failed.update({index[i]: why for i, why in bad.items()})
            index = [p for i, p in enumerate(index) if i not in bad]
            if not index:
                return Sampled([], logits.new_empty(0, dtype=torch.long), logits.new_empty(0), [], failed)
        logp = torch.log_softmax(rows_logits, -1)
        logprobs = logp.gather(-1, tokens[:, None])[:, 0]
        self.history.record(slot_t, tokens)
        return Sampled(index, tokens, logprobs, _top(logp, _pick(top_k, index)), failed)

    def _draw(self, logits, params, generators, keys, seen, counts) -> tuple[dict[int, str], torch.Tensor | None]:
        """(rows that cannot be sampled, with why; else the tokens)."""
        sampling = processed = None
        try:
            if not all(p.plain_greedy for p in params):
                sampling = self._sampler(keys, params)
                processed = sampling.process(logits, seen, counts)
        except Exception:
            if not self.isolate:
                raise
            failed = self._culprits(logits, params, seen, counts)
            if not failed:  # no row fails alone: not one request's fault
                raise
            return failed, None
        failed = _non_finite(logits, processed) if self.isolate else {}
        if failed:
            return failed, None
        return {}, logits.argmax(-1) if sampling is None else sampling.sample(processed, generators)

    def _sampler(self, keys: tuple[int, ...], params: list[SamplingParams]) -> BatchSampling:
        if self._batch is None or self._batch[0] != keys:
            self._batch = (keys, BatchSampling.from_params(params, self.device))
        return self._batch[1]

    def _culprits(self, logits, params, seen, counts) -> dict[int, str]:
        """After a batch's options failed: the rows whose options fail on their own, with why."""
        failed = {}
        for i, p in enumerate(params):
            one = slice(i, i + 1)
            try:
                BatchSampling.from_params([p], self.device).process(
                    logits[one], None if seen is None else seen[one], None if counts is None else counts[one])
            except Exception as e:
                failed[i] = f"its sampling options cannot be applied: {type(e).__name__}: {e}"
        return failed


def _pick(xs, index: list[int]) -> list:
    return [xs[i] for i in index]


def _top(logp: torch.Tensor, top_k: list[int]) -> list[list[tuple[int, float]]]:
    k = max(top_k, default=0)
    if not k:
        return [[] for _ in top_k]
    values, ids = logp.topk(k, -1)
    return [list(zip(ids[i, :n].tolist(), values[i, :n].tolist())) for i, n in enumerate(top_k)]


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
