"""The KV cache: keys and values of past tokens, kept so each decode step computes only the new one.

Without a cache, generating token t recomputes K and V for all t-1 earlier tokens (O(n²) work);
with it, a step projects only the new token and attends over the stored K/V.

Layout: one preallocated buffer per layer, indexed by *slot* (a sequence the engine is running;
generate/engine.py moves requests in and out of slots between steps) and *cell*:

- full-attention layers: ``k``/``v`` of shape (slots, kv_heads, max_len, head_dim); the token at
  sequence index ``i`` of a slot lives in cell ``i`` — written in place, never concatenated;
- sliding-window layers (Mistral) keep only a ring of ``window + chunk - 1`` cells: token ``i``
  lives in cell ``i % ring``. The extra ``chunk - 1`` cells let a prefill chunk write all its keys
  before attending while its first query still finds the ``window`` keys it needs;
- MLA layers (DeepSeek) store the compressed latent ``c_kv`` (rank) and the rotated RoPE key
  ``k_pe`` (rope_dim) — one shared "head" — instead of per-head K and V;
- linear-attention layers (``model/linear_attention.py``) hold no cells at all but a recurrent state per slot:
  S = Σ φ(k) vᵀ (kv_heads, head_dim, head_dim) and z = Σ φ(k) (kv_heads, head_dim), in float32, the same size
  at every length (``read_state`` / ``write_state``).

Per slot the cache also records which sequence indices hold real tokens (left padding does not)
and their position ids; attention masks and ALiBi biases are built from that, so rows of a batch
may hold sequences of different lengths and be at different steps.

A forward with a cache runs ``begin`` (choose slots, place the new tokens, build masks), then each
layer calls ``update`` with its new K/V and attends over what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from .sparse_attention_masks import sparse_pattern_mask


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token adds to the cache, summed over layers (sliding layers count until full).

    MHA/GQA/MQA: 2 (K and V) · n_kv_heads · head_dim per layer; MLA: kv_lora_rank + qk_rope_head_dim.
    """
    return cfg.n_layers * _elements_per_token(cfg) * _itemsize(dtype)


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                   chunk_size: int = 1) -> int:
    """Bytes of a cache holding ``batch`` sequences of ``seq_len`` tokens; sliding-window layers
    hold at most ``window + chunk_size - 1`` tokens."""
    if cfg.attention == "linear":  # S and z per kv head, float32, whatever the length
        return cfg.n_layers * batch * cfg.n_kv_heads * (cfg.head_dim + 1) * cfg.head_dim * 4
    per_layer = _elements_per_token(cfg) * _itemsize(dtype) * batch
    return sum(per_layer * _cells(cfg, layer, seq_len, chunk_size) for layer in range(cfg.n_layers))


def _elements_per_token(cfg: ModelConfig) -> int:
    if cfg.attention == "linear":  # the state does not grow with the sequence
        return 0
    if cfg.mla is not None:
        return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    return 2 * cfg.n_kv_heads * cfg.head_dim


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cells(cfg: ModelConfig, layer: int, max_len: int, chunk_size: int) -> int:
    if cfg.is_sliding(layer):
        return min(max_len, cfg.sliding_window + chunk_size - 1)
    return max_len


STATIC_BUCKET = 256  # static decode steps attend over a multiple of this many cells


@dataclass
class StepPlan:
    """Where the tokens of the current forward go, shared by all layers of that forward."""

    slots: torch.Tensor  # (batch,) cache slot of each row
    seq_index: torch.Tensor  # (batch, n_new) sequence index of each new token in its slot
    kv_len: int  # cells [0, kv_len) of full layers cover every key any row needs
    contiguous: slice | None  # slots as a slice when they are a consecutive range (views, no copies)
    position_ids: torch.Tensor  # (batch, n_new)
    masks: dict[bool, torch.Tensor]  # sliding? -> bool (batch, 1, n_new, keys), True = attend
    key_positions: torch.Tensor  # (batch, kv_len) position ids of the full layers' keys (ALiBi)


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        n_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int = 512,
        static: bool = False,
        lazy: bool = False,
    ) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        self.cfg, self.n_slots, self.max_len, self.chunk_size = cfg, n_slots, max_len, chunk_size
        # static: a decode step (one new token per row) attends over a whole bucket of cells (masked): the longest
        # row's length rounded up to STATIC_BUCKET, so shapes change only every STATIC_BUCKET tokens and a compiled
        # step is reused, not recompiled (a server's long cache is not read whole for short sequences)
        self.static = static
        self.dtype, self.device = dtype, torch.device(device)
        # lazy: cells left uninitialised (a scratch cache to compile a step on: untouched pages cost no memory)
        new = torch.empty if lazy else torch.zeros
        self.layers = [self._allocate(layer, new) for layer in range(cfg.n_layers)]
        self.ring = [_cells(cfg, i, max_len, chunk_size) if cfg.is_sliding(i) else None for i in range(cfg.n_layers)]
        self.lengths = [0] * n_slots  # tokens written per slot (padding included); host-side, no syncs
        self.next_position = torch.zeros(n_slots, dtype=torch.long, device=self.device)  # real tokens seen
        self.valid = torch.zeros(n_slots, max_len, dtype=torch.bool, device=self.device)  # real token?
        self.positions = torch.zeros(n_slots, max_len, dtype=torch.long, device=self.device)
        self.plan: StepPlan | None = None

    def _allocate(self, layer: int, new: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, cells = self.cfg, _cells(self.cfg, layer, self.max_len, self.chunk_size)
        if cfg.attention == "linear":  # the recurrent state S (slots, kv_heads, d, d) and z (slots, kv_heads, d)
            d = cfg.head_dim
            shapes = [(self.n_slots, cfg.n_kv_heads, d, d), (self.n_slots, cfg.n_kv_heads, d)]
            return tuple(new(s, dtype=torch.float32, device=self.device) for s in shapes)
        if cfg.mla is not None:  # (slots, 1, cells, rank) latent and (slots, 1, cells, rope) key
            mla = cfg.mla
            shapes = [(self.n_slots, 1, cells, mla.kv_lora_rank), (self.n_slots, 1, cells, mla.qk_rope_head_dim)]
        else:  # (slots, kv_heads, cells, head_dim) for K and for V
            shapes = [(self.n_slots, cfg.n_kv_heads, cells, cfg.head_dim)] * 2
        return tuple(new(s, dtype=self.dtype, device=self.device) for s in shapes)

    # --- bookkeeping -------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers for t in pair)

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Forget the sequences in ``slots`` (all by default) so new ones can use them."""
        for s in range(self.n_slots) if slots is None else slots:
            self.lengths[s] = 0
            self.valid[s] = False
            self.next_position[s] = 0
            if self.cfg.attention == "linear":  # a state is a sum: the next sequence starts from zero
                for pair in self.layers:
                    for t in pair:
                        t[s] = 0

    def copy_slot(self, src: int, dst: Sequence[int]) -> None:
        """Make slots ``dst`` continue the sequence in ``src`` (best-of-N shares one prefill)."""
        index = torch.tensor(list(dst), device=self.device)
        for pair in self.layers:
            for t in pair:
                t[index] = t[src].clone()  # clone: source and targets share the buffer
        for name in ("valid", "positions", "next_position"):
            getattr(self, name)[index] = getattr(self, name)[src].clone()
        for d in dst:
            self.lengths[d] = self.lengths[src]

    def read_cells(self, slot: int, start: int, n: int) -> list[tuple[torch.Tensor, ...]]:
        """Copies of cells [start, start + n) of ``slot``, per layer: what ``write_prefix`` puts back (prefix
        caching). Full-attention layers only: a ring's cells are not indexed by sequence position."""
        if any(self.ring):
            raise ValueError("cells of sliding-window rings cannot be copied out as a prefix")
        if self.cfg.attention == "linear":
            raise ValueError("a linear-attention cache holds a state per slot, not cells to copy out as a prefix")
        return [tuple(t[slot, :, start:start + n].clone() for t in pair) for pair in self.layers]

    def write_prefix(self, slot: int, cells: list[tuple[torch.Tensor, ...]], n: int) -> None:
        """``slot`` starts over holding a sequence of ``n`` real tokens (positions 0..n-1) whose K/V are the first
        ``n`` of ``cells`` (from ``read_cells``); the next tokens continue it."""
        self.reset([slot])
        for pair, saved in zip(self.layers, cells):
            for t, c in zip(pair, saved):
                t[slot, :, :n] = c[:, :n]
        self.valid[slot, :n] = True
        self.positions[slot, :n] = torch.arange(n, device=self.device)
        self.next_position[slot] = n
        self.lengths[slot] = n

    def reorder(self, index: torch.Tensor) -> None:
        """Slot i takes the content of slot index[i] (beam search keeps the surviving beams)."""
        for pair in self.layers:
            for t in pair:
                t.copy_(t.index_select(0, index))
        for name in ("valid", "positions", "next_position"):
            t = getattr(self, name)
            t.copy_(t.index_select(0, index))
        lengths = [self.lengths[i] for i in index.tolist()]
        self.lengths = lengths

    # --- one forward -------------------------------------------------------------------------
    def begin(
        self,
        slots: Sequence[int],
        n_new: int,
        attention_mask: torch.Tensor | None = None,  # (batch, n_new): 0 marks padding
        position_ids: torch.Tensor | None = None,  # (batch, n_new); default continues each slot
    ) -> StepPlan:
        """Place ``n_new`` tokens per row after what each slot holds and build the masks."""
        slots = list(slots)
        starts = [self.lengths[s] for s in slots]
        if max(starts) + n_new > self.max_len:
            worst = slots[max(range(len(slots)), key=lambda i: starts[i])]
            raise ValueError(f"slot {worst} holds {self.lengths[worst]} tokens; {n_new} more exceed the cache's "
                             f"max_len={self.max_len}")
        if any(self.ring) and n_new > self.chunk_size:
            raise ValueError(f"{n_new} new tokens exceed the cache's chunk_size={self.chunk_size} "
                             "(sliding-window rings are sized for it)")
        dev = self.device
        slot_t = torch.tensor(slots, device=dev)
        seq_index = torch.tensor(starts, device=dev)[:, None] + torch.arange(n_new, device=dev)  # (b, n)
        real = torch.ones(len(slots), n_new, dtype=torch.bool, device=dev) if attention_mask is None \
            else attention_mask.to(dev).bool()
        if position_ids is None:  # continue each slot's positions, skipping padding
            position_ids = self.next_position[slot_t][:, None] + (real.long().cumsum(-1) - 1).clamp(min=0)
        rows = slot_t[:, None]
        self.valid[rows, seq_index] = real
        self.positions[rows, seq_index] = position_ids
        self.next_position[slot_t] += real.long().sum(-1)
        for s in slots:
            self.lengths[s] += n_new

        static = self.static and n_new == 1  # decode steps only; prefill chunks run eagerly
        kv_len = max(starts) + n_new
        if static:
            kv_len = self.static_kv_len(kv_len)
        first = slots[0]
        contiguous = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        if static and self.n_slots > 1:
            # a slice's bounds would be baked into a compiled step; a cache of one slot is always slot 0, so a view
            # of it reads the cells in place (a gather copies 2 x kv_len cells per layer per step)
            contiguous = None
        valid = self._rows(self.valid, slot_t, contiguous)[:, :kv_len]  # (b, kv_len)
        key_index = torch.arange(kv_len, device=dev)
        masks = {False: _mask(seq_index, key_index[None], valid)}
        if any(self.ring):
            masks[True] = self._ring_mask(seq_index, slot_t, contiguous)
        key_positions = self._rows(self.positions, slot_t, contiguous)[:, :kv_len]
        if self.cfg.sparse_attention is not None:  # the model's fixed pattern, by position, over the full layers
            masks[False] = masks[False] & sparse_pattern_mask(self.cfg, position_ids, key_positions)
        self.plan = StepPlan(slot_t, seq_index, kv_len, contiguous, position_ids, masks, key_positions)
        return self.plan

    def static_kv_len(self, length: int) -> int:
        """Cells a static decode step attends over to cover ``length`` cells: a whole number of buckets."""
        return min(self.max_len, -(-length // STATIC_BUCKET) * STATIC_BUCKET)

    def _ring_mask(self, seq_index: torch.Tensor, slot_t: torch.Tensor, contiguous: slice | None) -> torch.Tensor:
        """Mask over the ring's cells: which sequence index each cell holds after this write."""
        ring = next(r for r in self.ring if r is not None)
        end = seq_index[:, -1:] + 1  # (b, 1) length after the write
        cell = torch.arange(ring, device=self.device)[None]  # (1, ring)
        held = cell + ring * torch.div(end - 1 - cell, ring, rounding_mode="floor")  # latest index ≡ cell
        present = held >= 0
        valid = self._rows(self.valid, slot_t, contiguous).gather(1, held.clamp(min=0)) & present
        window = self.cfg.sliding_window
        return _mask(seq_index, held, valid, window)

    @staticmethod
    def _rows(t: torch.Tensor, slot_t: torch.Tensor, contiguous: slice | None) -> torch.Tensor:
        return t[contiguous] if contiguous is not None else t[slot_t]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this forward's tensors for ``layer`` and return what attention should read.

        new: K and V (batch, kv_heads, n_new, head_dim) — or MLA's c_kv (batch, 1, n_new, rank) and
        rotated k_pe (batch, 1, n_new, rope_dim). Returns the same tensors over all cached cells the
        plan's masks describe: (batch, kv_heads, kv_len or ring, head_dim).
        """
        plan = self.plan
        ring = self.ring[layer]
        cells = plan.seq_index % ring if ring is not None else plan.seq_index  # (b, n)
        out = []
        for buf, t in zip(self.layers[layer], new):
            buf[plan.slots[:, None], :, cells] = t.transpose(1, 2).to(buf.dtype)  # (b, n, heads, d)
            if ring is not None:
                out.append(buf[plan.contiguous] if plan.contiguous is not None else buf[plan.slots])
            elif plan.contiguous is not None:
                out.append(buf[plan.contiguous, :, : plan.kv_len])  # a view
            else:  # gather only the cells in use: a server's slots are scattered and its cache is long
                out.append(buf[plan.slots, :, : plan.kv_len])
        return tuple(out)

    def new_tokens_real(self) -> torch.Tensor:
        """(batch, n_new) True where this forward's token is real (not padding)."""
        plan = self.plan
        return self.valid[plan.slots[:, None], plan.seq_index]

    def read_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear-attention layer's (S, z) for the plan's rows: (batch, kv_heads, d, d), (batch, kv_heads, d)."""
        plan = self.plan
        return tuple(self._rows(t, plan.slots, plan.contiguous) for t in self.layers[layer])

    def write_state(self, layer: int, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Store a linear-attention layer's (S, z) after this forward, for the plan's rows."""
        for buf, t in zip(self.layers[layer], state):
            buf[self.plan.slots] = t


def _mask(seq_index: torch.Tensor, key_index: torch.Tensor, valid: torch.Tensor, window: int | None = None):
    """(batch, 1, n_new, keys) bool: causal over sequence indices, real keys only, optional window.

    A query always sees itself, so padding queries never get an empty (NaN) softmax row.
    """
    q = seq_index[:, None, :, None]  # (b, 1, n, 1)
    k = key_index[:, None, None, :]  # (b or 1, 1, 1, keys)
    allowed = (k <= q) & valid[:, None, None, :]
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed | (k == q)
