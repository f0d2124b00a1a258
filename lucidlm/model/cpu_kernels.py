"""CPU fast paths for the two products a decoder spends its time in; each gives the numbers of the
plain form it replaces (up to summation order) and is reached from one dispatch point:
``attention.attend`` → ``use_one_query`` / ``attend_one_query``, ``linear.Linear.forward`` → ``linear``.

Attention, decode step (one query per row). On CPU, SDPA's fused bfloat16/float16 kernel is built for
blocks of queries; with one query it runs ~8x slower than two matmuls and a float32 softmax.

Linear layers:
- packed weights (``pack_linears``): a copy of each weight reordered into oneDNN's blocked layout,
  which oneDNN's kernels stream at near the read bandwidth at every batch size — about 2x BLAS for a
  decode step and prefill alike — at the price of a second copy of the weight. The copies sit in a
  registry keyed by the weight's data pointer, so that a compiled graph (which sees only the weight
  tensor) finds them too, through an opaque custom op that looks them up at run time. A copy is used
  only without autograd and while its weight is unchanged (its version counter is checked), so
  training and ``load_state_dict`` never see a stale one;
- the compiled batch-1 matrix-vector form (``gemv``): a decode step multiplies every weight by one
  vector, so its speed is that of streaming the weights. BLAS's gemv streams them at well under the
  machine's read bandwidth; written as an elementwise product summed over the input axis,
  ``torch.compile`` (inductor) emits one vectorised reduction loop that runs near it. Eagerly that
  form would materialise the product, so it is used only while compiling, for one row (``use_gemv``);
- inference products through oneDNN on the plain weight (``ONEDNN_INFERENCE``): no copy, and on CPUs where
  BLAS's small-batch GEMM is slow (MKL on AMD) about 1.4x BLAS for a batch-8 decode step and a prefill;
- fp32 training GEMMs through oneDNN (``OneDNNLinear``): on AVX-512 CPUs where BLAS takes a generic
  path (seen: MKL on AMD EPYC) oneDNN runs the same products about twice as fast.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

# --- attention: one query per row ---------------------------------------------------------------


def use_one_query(q: torch.Tensor) -> bool:
    """A decode step (one query) in bfloat16/float16 on CPU, where ``attend_one_query`` beats SDPA."""
    return q.shape[2] == 1 and q.dtype != torch.float32 and q.device.type == "cpu"


def attend_one_query(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attention.attend`` as two matmuls and a float32 softmax, for a decode step (one query per row).

    Query heads are grouped by the K/V head they share (GQA), so K and V are read once per group,
    never repeated. Shapes and mask/bias conventions are ``attend``'s.
    """
    b, h, s, d = q.shape
    kv = k.shape[1]
    g = h // kv
    scores = (q.reshape(b, kv, g * s, d) @ k.transpose(-1, -2)).float() * scale  # (b, kv, g·s, keys)
    scores = scores.view(b, kv, g, s, -1)
    if bias is not None:
        scores = scores + bias.float().view(b, kv, g, s, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # (b, 1, 1, s, keys)
    probs = scores.softmax(-1).to(v.dtype).view(b, kv, g * s, -1)
    return (probs @ v).view(b, h, s, v.shape[-1])


# --- linear: the dispatch ------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) on CPU by the fastest path that applies (see the module docstring)."""
    if torch.is_grad_enabled():
        plain_fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        if ONEDNN_TRAINING and plain_fp32 and not torch.compiler.is_compiling():
            return OneDNNLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():  # the registry is looked up at run time, inside the op
        return gemv(x, weight, bias) if use_gemv(x) else _linear_packed_op(x, weight, bias)
    return linear_packed(x, weight, bias)


# --- linear: the compiled batch-1 matrix-vector form ---------------------------------------------


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) · weightᵀ (in, out) as a reduction, accumulated in float32 like BLAS does.

    Inductor turns it into one vectorised loop per output that streams the weight row once."""
    y = (weight.float() * x.float()[..., None, :]).sum(-1)  # (..., out, in) -> (..., out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def use_gemv(x: torch.Tensor) -> bool:
    """One row (a batch-1 decode step) on CPU, while compiling (on CUDA, cuBLAS's gemv is fine).
    With more rows inductor vectorises across them and parallelises each output's reduction
    separately, far slower than BLAS."""
    # guard_or_false: an MoE expert's rows are a size known only at run time (unbacked), never taken as one row
    return torch.compiler.is_compiling() and x.device.type == "cpu" and guard_or_false(x.numel() == x.shape[-1])


# --- linear: oneDNN-packed weights ---------------------------------------------------------------

# data_ptr of a weight -> (its packed copy, the weight, its version when packed).
_PACKED: dict[int, tuple[torch.Tensor, weakref.ref, int]] = {}


@functools.cache  # asked on every inference product: the CPU's answer does not change
def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of ``dtype`` on this CPU (float32 always; bf16/fp16 with AVX-512 BW and up)."""
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_packable(dtype: torch.dtype) -> None:
    """oneDNN packs bfloat16/float16 weights only on CPUs with the instructions for them (AVX-512 BW and up)."""
    if not packable(dtype):
        raise ValueError(f"packed {str(dtype).replace('torch.', '')} weights need a CPU with AVX-512 (oneDNN's "
                         f"reduced-precision kernels); this one has {torch.backends.cpu.get_cpu_capability()}: "
                         "use float32, or no pack_weights")


def pack_weight(weight: torch.Tensor, rows: int = 1) -> None:
    """Keep a copy of ``weight`` in oneDNN's blocked layout, tuned for ``rows`` rows (CPU only)."""
    if weight.device.type != "cpu":
        raise ValueError("packed weights are for CPU: oneDNN's blocked layout")
    check_packable(weight.dtype)
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=rows)
    ptr = weight.data_ptr()
    _PACKED[ptr] = (packed, weakref.ref(weight), weight._version)
    weakref.finalize(weight, _PACKED.pop, ptr, None)  # the copy goes when the weight does


def unpack_weight(weight: torch.Tensor) -> None:
    _PACKED.pop(weight.data_ptr(), None)


def is_packed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` has a current packed copy (none once it changed since packing)."""
    return _packed_for(weight) is not None


def _packed_for(weight: torch.Tensor) -> torch.Tensor | None:
    ptr = weight.data_ptr()
    entry = _PACKED.get(ptr)
    if entry is None:
        return None
    packed, ref, version = entry
    original = ref()
    if original is None or original.data_ptr() != ptr or original._version != version or original.shape != weight.shape:
        return None  # changed since (an optimizer step, load_state_dict, new storage): stale
    return packed


def linear_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear without autograd: through the weight's packed copy where one is current, else through oneDNN on the
    plain weight where it can (``ONEDNN_INFERENCE``), else BLAS."""
    packed = _packed_for(weight) if _PACKED else None
    if x.dtype != weight.dtype or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if ONEDNN_INFERENCE and packable(x.dtype) and weight.is_contiguous() and _onednn_pays(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN on a plain weight costs ~50 us a call (its primitive is set up each time): BLAS is faster below ~1M
    weights at one row and ~8M multiply-adds at more (measured on AMD EPYC: 768x256 at 8 rows BLAS 88 us,
    oneDNN 108; 2048x768 at 1 row 161 vs 118, at 8 rows 701 vs 503)."""
    n = weight.numel()
    return n >= 1 << 20 or n * (x.numel() // x.shape[-1]) >= 1 << 23


@torch.library.custom_op("lucidlm::linear_packed", mutates_args=())
def _linear_packed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear_packed`` as an opaque op, so torch.compile calls it instead of tracing into oneDNN."""
    with torch.no_grad():
        return linear_packed(x, weight, bias)


@_linear_packed_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def pack_linears(model: nn.Module, rows: int = 1) -> int:
    """``pack_weight`` every lucidlm ``Linear`` of ``model``; returns the bytes the packed copies take."""
    total = 0
    for m in _linears(model):
        pack_weight(m.weight, rows)
        total += m.weight.numel() * m.weight.element_size()
    return total


def unpack_linears(model: nn.Module) -> None:
    for m in _linears(model):
        unpack_weight(m.weight)


def _linears(model: nn.Module) -> list[nn.Linear]:
    from .linear import Linear  # here, not at the top: linear.py dispatches into this module

    return [m for m in model.modules() if isinstance(m, Linear)]


# --- linear: fp32 training GEMMs through oneDNN --------------------------------------------------


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with oneDNN's fp32 GEMM in the forward and both backward products.

    On AVX-512 CPUs where BLAS takes a generic path (seen: MKL on AMD EPYC, ~200 GFLOP/s on 2
    cores) oneDNN runs the same fp32 products at ~400; the gradient is the textbook one:
    dx = g W, dW = gᵀ x, db = Σ g.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.shape[-1])  # (rows, in)
        return _onednn(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # (rows, out)
        rows = x.reshape(-1, x.shape[-1])  # (rows, in)
        dx = _onednn(g, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None  # g (rows,out)·W (out,in)
        dw = _onednn(g.t(), rows.t()) if ctx.needs_input_grad[1] else None  # gᵀ (out,rows)·x (rows,in)
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


ONEDNN_TRAINING = torch.backends.mkldnn.is_available()  # route fp32 CPU training matmuls through oneDNN
# inference matmuls of more than one row through oneDNN on the plain weight (no copy): measured on AMD EPYC (AVX2,
# MKL), a batch-8 decode step 1.4x and a 64-token prefill 1.45x faster than BLAS (lucidlm bench)
ONEDNN_INFERENCE = torch.backends.mkldnn.is_available()
