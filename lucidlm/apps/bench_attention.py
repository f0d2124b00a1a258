"""``lucidlm bench --attention``: time and memory of attention kinds vs sequence length, side by side.

Batch 1, ``heads`` × ``head_dim``, float32, inference. A forward over N positions per method:

- SDPA causal: ``F.scaled_dot_product_attention(is_causal=True)``, the fused kernel, no mask materialised;
- SDPA + causal mask: the same with a boolean N×N mask, as lucidlm's ``attend`` runs every masked layer;
- linear, chunked: ``linear_attention_chunked`` (the parallel form training uses), feature map included;
- local + global: SDPA with Longformer's mask (``local_global_mask``: a window, a few global tokens);
- block-sparse: SDPA with BigBird's block mask (``bigbird_layout``: window, global and random blocks).

And a decode step after N positions, where the recurrent form is what runs:

- SDPA decode: one query over the N cached keys and values (what a KV cache holds: 2·N·heads·head_dim);
- linear, recurrent: one ``recurrent_step`` from the state of the positions before (heads·head_dim·(head_dim + 1),
  whatever N). Its whole-sequence form, ``linear_attention_recurrent``, is N of these steps (tested equal to the
  chunked form); timing N Python-level steps per length would take the bench past its time budget, so the step
  is measured and the table says so.

Time: median of ``repeats`` runs after a warm-up (the warm-up is where memory is measured), all methods in one
process. Memory: on CUDA,
``torch.cuda.max_memory_allocated`` above what was allocated before the call; on Linux CPUs, the growth of the
process's peak resident set during the call (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, free
heap memory handed back first with ``malloc_trim``) — measured, temporaries inside kernels included. The masks are
built before the call (once per forward in a model, shared by its layers); their N×N bytes are listed on their
own, since SDPA with a boolean mask holds one whatever its sparsity: a mask pattern says which scores matter,
only a block-sparse kernel would skip the others. "allowed" is the share of (query, key) pairs the mask keeps.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.attention import attend
from ..model.linear_attention import feature_map, linear_attention_chunked, recurrent_step
from ..model.sparse_attention_masks import bigbird_layout, block_sparse_mask, local_global_mask

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
METHODS = ("SDPA causal", "SDPA + causal mask", "linear, chunked", "local + global", "block-sparse")
STEPS = ("SDPA decode", "linear, recurrent")


@dataclass(frozen=True)
class Patterns:
    """The sparse patterns measured (Longformer's and BigBird's defaults, scaled to these lengths)."""

    window: int = 256  # local + global: the tokens before each query, itself included
    global_tokens: int = 16
    block_size: int = 64  # block-sparse
    window_blocks: int = 2  # the query's block and the one before
    global_blocks: int = 1
    random_blocks: int = 2


@dataclass
class Row:
    n: int
    seconds: dict[str, float]
    peak_bytes: dict[str, int | None]
    mask_bytes: dict[str, int]
    allowed: dict[str, float]
    held_bytes: dict[str, int]  # decode steps: what the cache holds after N positions


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """After one call already made (the warm-up that measured memory)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_peak_supported() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Memory ``fn`` adds at its peak (its output included): CUDA's allocator peak, or the CPU process's peak RSS
    growth; None where neither can be read."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu" or not _cpu_peak_supported():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS, so reuse shows as growth
    except OSError:  # not glibc: nothing to trim, the reading is only less tight
        pass
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident set
    before = _status_bytes("VmRSS")
    out = fn()
    del out
    return max(_status_bytes("VmHWM") - before, 0)


def _methods(q, k, v, masks: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    scale = q.shape[-1] ** -0.5

    return {
        "SDPA causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
        "SDPA + causal mask": lambda: attend(q, k, v, masks["SDPA + causal mask"], scale),
        "linear, chunked": lambda: linear_attention_chunked(feature_map(q), feature_map(k), v)[0],
        "local + global": lambda: attend(q, k, v, masks["local + global"], scale),
        "block-sparse": lambda: attend(q, k, v, masks["block-sparse"], scale),
    }


def _steps(q, k, v) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, int]]:
    """The decode step of position N (the last of q, k, v; its key and value already cached, as the engine does):
    SDPA over the N cached keys, or one recurrent step from the state of the N - 1 before it; and the bytes each
    one's cache holds."""
    scale = q.shape[-1] ** -0.5
    q1, k1, v1 = q[:, :, -1:], k[:, :, -1], v[:, :, -1]  # the new token
    _, state = linear_attention_chunked(feature_map(q[:, :, :-1]), feature_map(k[:, :, :-1]), v[:, :, :-1])

    def nbytes(*ts: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in ts)
    steps = {"SDPA decode": lambda: F.scaled_dot_product_attention(q1, k, v, scale=scale),
             "linear, recurrent": lambda: recurrent_step(feature_map(q1[:, :, 0]), feature_map(k1), v1, state)[0]}
    return steps, {"SDPA decode": nbytes(k, v), "linear, recurrent": nbytes(*state)}


def _masks(n: int, patterns: Patterns, device: torch.device) -> dict[str, torch.Tensor]:
    pos = torch.arange(n, device=device)[None]
    n_blocks = -(-n // patterns.block_size)
    layout = bigbird_layout(n_blocks, patterns.window_blocks, patterns.global_blocks, patterns.random_blocks)
    return {
        "SDPA + causal mask": (pos[0, None, :] <= pos[0, :, None])[None, None],
        "local + global": local_global_mask(pos, pos, patterns.window, patterns.global_tokens),
        "block-sparse": block_sparse_mask(pos, pos, patterns.block_size, layout),
    }


@torch.inference_mode()
def run_attention_bench(lengths: tuple[int, ...] = LENGTHS, heads: int = 8, head_dim: int = 64, repeats: int = 3,
                        device: str = "cpu", patterns: Patterns = Patterns(),
                        print_fn: Callable[[str], None] = print) -> list[Row]:
    """One row per length: seconds, peak bytes, mask bytes and allowed share per method."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rows = []
    for n in lengths:
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, device=dev) for _ in range(3))
        masks = _masks(n, patterns, dev)
        steps, held = _steps(q, k, v)
        methods = {**_methods(q, k, v, masks), **steps}
        peaks = {name: peak_bytes(fn, dev) for name, fn in methods.items()}  # also each one's warm-up
        seconds = {name: _median_seconds(fn, repeats * (1 + 9 * (name in steps)), sync)
                   for name, fn in methods.items()}  # a step is short: more repeats
        rows.append(Row(n, seconds, peaks, {name: m.numel() * m.element_size() for name, m in masks.items()},
                        {name: float(m.float().mean()) for name, m in masks.items()}, held))
        print_fn(f"done: N = {n}")
        del q, k, v, masks
    return rows


def _mib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def attention_table(rows: list[Row], heads: int = 8, head_dim: int = 64, device: str = "cpu") -> str:
    """Markdown tables: forward ms; its peak MiB, with each mask's MiB and allowed share; the decode step."""
    memory_how = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else \
        "growth of the process's peak RSS during the call"
    head = "| N | " + " | ".join(METHODS) + " |"
    rule = "|---" * (len(METHODS) + 1) + "|"
    time_rows = [f"| {r.n} | " + " | ".join(f"{1e3 * r.seconds[m]:.2f}" for m in METHODS) + " |" for r in rows]
    masked = [m for m in METHODS if m in rows[0].mask_bytes]

    def memory(r: Row, m: str) -> str:
        cell = _mib(r.peak_bytes[m])
        if m in r.mask_bytes:
            cell += f" (+ mask {_mib(r.mask_bytes[m])}, {100 * r.allowed[m]:.0f}% allowed)"
        return cell
    memory_rows = [f"| {r.n} | " + " | ".join(memory(r, m) for m in METHODS) + " |" for r in rows]
    return (f"Forward time, ms (median; batch 1, {heads} heads × {head_dim}, float32)\n\n" + "\n".join(
        [head, rule, *time_rows]) + f"\n\nPeak memory of the call, MiB ({memory_how}; output included). Masks "
            f"({', '.join(masked)}) are built before the call: their N×N bytes and the share of pairs they allow "
            "are given beside it\n\n" + "\n".join([head, rule, *memory_rows]) + _steps_table(rows, memory_how))


def _steps_table(rows: list[Row], memory_how: str) -> str:
    lines = ["| N | SDPA decode, ms | linear recurrent step, ms | SDPA decode peak MiB | recurrent step peak MiB "
             "| KV cache MiB (K and V of N positions) | linear state MiB (S and z) |", "|---" * 7 + "|"]
    for r in rows:
        (sd, lr), (ps, pl) = (r.seconds[m] for m in STEPS), (r.peak_bytes[m] for m in STEPS)
        held = [r.held_bytes[m] for m in STEPS]
        lines.append(f"| {r.n} | {1e3 * sd:.3f} | {1e3 * lr:.3f} | {_mib(ps)} | {_mib(pl)} | {_mib(held[0])} "
                     f"| {_mib(held[1])} |")
    return ("\n\nDecode step after N positions (one new token; the whole-sequence recurrent form is N such steps). "
            f"Peak: {memory_how}; cache sizes from the tensors' shapes\n\n" + "\n".join(lines))
