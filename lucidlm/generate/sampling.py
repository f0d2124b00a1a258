"""Logits processors and the sampler: one decode step for a batch whose rows may be different requests.

Order, copied from transformers 5.23.0 ``GenerationMixin._get_logits_processor`` (generation/utils.py):

1. repetition penalty, among the processors that always run (line 1472), greedy or not;
2. only when sampling (``if generation_config.do_sample:``, line 1597), the former "warpers":
   temperature (1613), top-k (1618), top-p (1622), min-p (1627).

So min-p comes last: its threshold is relative to the top probability *after* temperature and after top-k/top-p
have cut the tail. Greedy decoding (``do_sample=False``) takes the argmax after the repetition penalty alone
(utils.py line 3278); sampling draws ``torch.multinomial(softmax(scores), 1)`` (lines 3274-3276).

Study notes on LLM sampling often give top-k -> top-p -> temperature ("KPT" joint sampling); transformers
applies temperature *first*, so it changes which tokens top-p keeps, not only how flat the survivors are.

OpenAI's own processors, for the server and its clients, run before all of these, in vLLM's order: ``logit_bias``
(added to the raw logits), then — after the repetition penalty — ``frequency_penalty`` × how often a token was
generated and ``presence_penalty`` × whether it was (OpenAI's formula; counts cover generated tokens only, as in
OpenAI and vLLM, while the repetition penalty also covers the prompt, as in transformers).

Every row has its own parameters (continuous batching); a processor that is off in every row is skipped, and a
row where it is off gets an exact no-op (divide by 1, a threshold that removes nothing), so a row's result never
depends on its neighbours. Masked entries become -inf, as in transformers.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import torch
from torch import Tensor

_NEG_INF = float("-inf")
# a token id written as a string (a JSON key): ASCII digits only, since str.isdigit and int() also take "²",
# "١٢" and "５" (the last two silently, as 12 and 5)
_ASCII_INT = re.compile(r"-?[0-9]{1,18}")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. The defaults switch every processor off."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off, must be in (0, 1]
    min_p: float = 0.0  # 0 = off, in [0, 1]
    repetition_penalty: float = 1.0  # 1 = off, > 0 (CTRL paper, Keskar et al. 2019)
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI: minus this once a token was generated, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI: minus this × the token's count so far, in [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI: (token id, bias in [-100, 100]) added to the logits

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, dict):  # the API's {token id: bias}; ids may arrive as strings (JSON keys)
            object.__setattr__(self, "logit_bias", tuple(sorted(
                (int(k) if isinstance(k, str) and _ASCII_INT.fullmatch(k) else k, v)
                for k, v in self.logit_bias.items())))
        object.__setattr__(self, "logit_bias", tuple(tuple(pair) for pair in self.logit_bias))
        self.validate()

    def validate(self) -> None:
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_k = _integer("top_k", self.top_k)
        if not 0 <= top_k < 2**63:  # larger than any vocabulary keeps every token; beyond int64 it cannot be stored
            raise ValueError(f"top_k must be in [0, 2**63) (0 = off), got {top_k}")
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        min_p = _real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {value}")
        for pair in self.logit_bias:
            if len(pair) != 2:
                raise ValueError(f"logit_bias entries must be (token id, bias), got {pair!r}")
            token, bias = _integer("logit_bias token id", pair[0]), _real("logit_bias value", pair[1])
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            if not 0 <= seed < 2**64:  # the range torch.Generator.manual_seed accepts without wrapping
                raise ValueError(f"seed must be in [0, 2**64), got {seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs per-row counts of the generated tokens."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor that can change the argmax: the argmax of the raw logits."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.counts_tokens and not self.logit_bias


def _real(name: str, value: object) -> float:
    # bool is an int in Python; temperature=True is a bug, not 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def seen_tokens(ids: Tensor, vocab_size: int, mask: Tensor | None = None) -> Tensor:
    """(batch, seq) ids -> (batch, vocab) bool, True where the row contains the token.

    ``mask`` (batch, seq), 0 at padding, keeps padding out. Ids outside [0, vocab) cannot be sampled, so like
    transformers (which clamps them onto a dropped extra column) they mark nothing.
    """
    ids = ids.long()
    keep = (ids >= 0) & (ids < vocab_size)
    if mask is not None:
        keep &= mask.bool()
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.masked_fill(~keep, vocab_size), True)  # the extra column absorbs what is left out
    return seen[:, :vocab_size].contiguous()


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """CTRL's penalty on tokens already present: divide positive logits, multiply negative ones, so the token
    always becomes less likely when penalty > 1. Applied once per token however often it occurred."""
    penalty = penalty.view(-1, 1)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty).to(logits.dtype)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's penalties: logit[j] -= frequency × count[j] + presence × (count[j] > 0), per row."""
    counts = counts.to(torch.float32)
    penalty = frequency.view(-1, 1) * counts + presence.view(-1, 1) * (counts > 0)
    return (logits.float() - penalty).to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row by its temperature (> 0; pass 1 for rows to leave alone, x / 1 is exact)."""
    # float32 temperatures, then back to the logits dtype: for bf16/fp16 that is what dividing by a Python float
    # does on CPU (compute in float32, round once)
    return (logits / temperature.view(-1, 1)).to(logits.dtype)


def apply_top_k(logits: Tensor, k: Tensor, min_tokens_to_keep: int = 1, k_max: int | None = None) -> Tensor:
    """Keep the k highest logits of each row (k = 0: row untouched). Ties with the k-th value survive, as in
    transformers (``scores < kth`` is removed). ``k_max``, the largest k, saves a device sync when known."""
    vocab = logits.shape[-1]
    k = k.view(-1)
    # transformers: max(top_k, min_tokens_to_keep), then min(., vocab); clamp gives max when min > max
    k = torch.where(k > 0, k.clamp(min=min_tokens_to_keep, max=vocab), 0)
    if k_max is None:
        k_max = int(k.max())  # a device sync; BatchSampling knows the value on the host
    if k_max <= 0:
        return logits
    k_max = min(max(k_max, min_tokens_to_keep), vocab)
    top = torch.topk(logits, k_max, dim=-1).values  # descending, so column k-1 is the k-th largest value
    kth = top.gather(1, (k - 1).clamp(min=0).view(-1, 1)).masked_fill((k == 0).view(-1, 1), _NEG_INF)
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: Tensor, p: Tensor, min_tokens_to_keep: int = 1) -> Tensor:
    """Nucleus filtering; rows with p >= 1 are untouched.

    transformers removes sorted entries whose ascending cumulative probability is <= 1 - top_p, with 1 - top_p
    computed in Python (double) and rounded once; pass ``p`` as float64 to get that threshold bit for bit.
    """
    floor = torch.where(p < 1, 1 - p, -1.0)  # -1: no cumulative sum is <= -1, so the row keeps everything
    return _top_p(logits, floor.view(-1), min_tokens_to_keep)


def _top_p(logits: Tensor, floor: Tensor, min_tokens_to_keep: int = 1) -> Tensor:
    # Same ops as TopPLogitsWarper: ascending sort, so ties fall as transformers' sort leaves them, and the
    # largest logits (the ones always kept) are at the end
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # a comparison with a Python float rounds it to the tensor dtype; do the same with the per-row floor
    remove = cumulative <= floor.view(-1, 1).to(cumulative.dtype)
    remove[..., -min_tokens_to_keep:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), _NEG_INF)


def apply_min_p(logits: Tensor, min_p: Tensor, min_tokens_to_keep: int = 1) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability (min_p = 0: untouched)."""
    probs = logits.softmax(dim=-1)
    scaled = (min_p.view(-1, 1) * probs.amax(dim=-1, keepdim=True)).to(probs.dtype)
    remove = probs < scaled
    if min_tokens_to_keep > 1:
        # with one token to keep this is a no-op: the top probability is never below min_p * itself (min_p <= 1)
        keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
    return logits.masked_fill(remove, _NEG_INF)


def row_generator(params: SamplingParams, sample_index: int, device: torch.device | str) -> torch.Generator | None:
    """A seeded row's own generator: sample j of a request draws with seed + j (OpenAI's n choices, best-of-N);
    None (the global RNG) for an unseeded row and for a greedy one."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed + sample_index)


class BatchSampling:
    """Per-row parameters as device tensors, built once per batch composition, so a decode step does no
    host-to-device copies and no syncs. Greedy rows get neutral warper values: transformers runs no warper when
    do_sample=False, so their processed logits are the raw logits after the repetition penalty."""

    def __init__(self, params: list[SamplingParams], device: torch.device | str) -> None:
        if not params:
            raise ValueError("params is empty: a batch needs at least one row")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params[{i}] must be SamplingParams, got {type(p).__name__}")
            p.validate()
        self.params = list(params)
        self.batch_size = len(params)
        greedy = [p.greedy for p in params]
        temperature = [1.0 if g else float(p.temperature) for g, p in zip(greedy, params)]
        top_k = [0 if g else p.top_k for g, p in zip(greedy, params)]
        top_p = [1.0 if g else float(p.top_p) for g, p in zip(greedy, params)]
        min_p = [0.0 if g else float(p.min_p) for g, p in zip(greedy, params)]
        penalty = [float(p.repetition_penalty) for p in params]
        presence = [float(p.presence_penalty) for p in params]
        frequency = [float(p.frequency_penalty) for p in params]

        f32 = dict(dtype=torch.float32, device=device)
        self.greedy = torch.tensor(greedy, dtype=torch.bool, device=device)
        self.temperature = torch.tensor(temperature, **f32)
        self.top_k = torch.tensor(top_k, dtype=torch.int64, device=device)
        # 1 - top_p in Python double, rounded once, as transformers' threshold is (float32 1 - float32 p is not)
        self.top_p_floor = torch.tensor([1.0 - p if p < 1 else -1.0 for p in top_p], **f32)
        self.min_p = torch.tensor(min_p, **f32)
        self.repetition_penalty = torch.tensor(penalty, **f32)
        self.presence = torch.tensor(presence, **f32)
        self.frequency = torch.tensor(frequency, **f32)
        self.bias = [p.logit_bias for p in params]  # made dense once the vocabulary size is known
        self._dense_bias: Tensor | None = None
        self.device = device

        # host-side flags: which processors run at all, decided once instead of every step
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.any_penalty = any(x != 1.0 for x in penalty)
        self.any_counts = any(p.counts_tokens for p in params)
        self.any_bias = any(self.bias)
        self.any_temperature = any(x != 1.0 for x in temperature)
        self.top_k_max = max(top_k)
        self.any_top_p = any(x < 1.0 for x in top_p)
        self.any_min_p = any(x > 0.0 for x in min_p)
        self._sampled_rows = [i for i, g in enumerate(greedy) if not g]

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> BatchSampling:
        return cls(params, device)

    def process(self, logits: Tensor, seen: Tensor | None, counts: Tensor | None = None) -> Tensor:
        """(batch, vocab) logits -> processed logits (filtered entries -inf), in transformers' order.
        ``counts`` (batch, vocab): how often each token was generated, for presence/frequency penalties."""
        if logits.dim() != 2 or logits.shape[0] != self.batch_size:
            raise ValueError(f"logits must be (batch={self.batch_size}, vocab), got {tuple(logits.shape)}")
        if self.any_bias:
            logits = (logits.float() + self._bias(logits.shape[1])).to(logits.dtype)
        if self.any_penalty:
            if seen is None:
                raise ValueError("a row has repetition_penalty != 1 but seen is None")
            if seen.shape != logits.shape:
                raise ValueError(f"seen must have the logits' shape {tuple(logits.shape)}, got {tuple(seen.shape)}")
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if self.any_counts:
            if counts is None or counts.shape != logits.shape:
                raise ValueError(f"a row has presence/frequency penalties: counts must have the logits' shape "
                                 f"{tuple(logits.shape)}, got {None if counts is None else tuple(counts.shape)}")
            logits = apply_presence_frequency(logits, counts, self.presence, self.frequency)
        if self.any_temperature:
            logits = apply_temperature(logits, self.temperature)
        if self.top_k_max > 0:
            logits = apply_top_k(logits, self.top_k, k_max=self.top_k_max)
        if self.any_top_p:
            logits = _top_p(logits, self.top_p_floor)
        if self.any_min_p:
            logits = apply_min_p(logits, self.min_p)
        return logits

    def _bias(self, vocab: int) -> Tensor:
        if self._dense_bias is None or self._dense_bias.shape[1] != vocab:
            dense = torch.zeros(self.batch_size, vocab, dtype=torch.float32)
            for row, pairs in enumerate(self.bias):
                for token, value in pairs:
                    if token >= vocab:
                        raise ValueError(f"logit_bias names token {token}, outside the vocabulary of {vocab}")
                    dense[row, token] = value
            self._dense_bias = dense.to(self.device)
        return self._dense_bias

    def sample(self, logits: Tensor, generators: list[torch.Generator | None]) -> Tensor:
        """Next ids (batch,) int64 from ``process``'s output: argmax for greedy rows, a multinomial draw from the
        softmax for the others, each seeded row from its own generator so its tokens do not depend on which
        other requests share the batch."""
        if len(generators) != self.batch_size:
            raise ValueError(f"need one generator (or None) per row: {self.batch_size}, got {len(generators)}")
        if self.all_greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)
        shared = [i for i in self._sampled_rows if generators[i] is None]
        if len(shared) == self.batch_size:  # the common case: one draw for the whole batch
            return torch.multinomial(probs, 1).squeeze(1)
        tokens = logits.argmax(dim=-1) if self.any_greedy else logits.new_empty(self.batch_size, dtype=torch.int64)
        if shared:
            rows = torch.tensor(shared, device=logits.device)
            tokens[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
        for i in self._sampled_rows:
            if generators[i] is not None:
                tokens[i : i + 1] = torch.multinomial(probs[i], 1, generator=generators[i])
        return tokens
