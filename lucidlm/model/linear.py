"""``Linear``: ``nn.Linear`` with a matrix-vector form for compiled decode steps.

A decode step multiplies every weight matrix by one vector per sequence, so its speed is the
speed of streaming the weights from memory. On CPU, BLAS's gemv streams them at well under the
machine's read bandwidth; written as an elementwise product summed over the input axis,
``torch.compile`` (inductor) emits one vectorised reduction loop that runs near it. Eagerly that
form would materialise the product, so it is used only while compiling, and only for a few rows
(see ``use_gemv``).

Outside ``torch.compile`` this is exactly ``nn.Linear``; parameters and state-dict names are the same.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


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
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]


# Packed copies of weights, keyed by the weight's data pointer so that a compiled graph (which sees
# only the weight tensor) finds them too: data_ptr -> (packed, the weight, its version when packed).
_PACKED: dict[int, tuple[torch.Tensor, weakref.ref, int]] = {}


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
    """F.linear through the weight's packed copy where one is current, else plain F.linear."""
    packed = _packed_for(weight)
    if packed is None or x.dtype != weight.dtype or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.library.custom_op("lucidlm::linear_packed", mutates_args=())
def _linear_packed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear_packed`` as an opaque op, so torch.compile calls it instead of tracing into oneDNN."""
    with torch.no_grad():
        return linear_packed(x, weight, bias)


@_linear_packed_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


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


def check_packable(dtype: torch.dtype) -> None:
    """oneDNN packs bfloat16/float16 weights only on CPUs with the instructions for them (AVX-512 BW and up)."""
    if dtype != torch.float32 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(f"packed {str(dtype).replace('torch.', '')} weights need a CPU with AVX-512 (oneDNN's "
                         f"reduced-precision kernels); this one has {torch.backends.cpu.get_cpu_capability()}: "
                         "use float32, or no pack_weights")


class Linear(nn.Linear):
    def pack(self, rows: int = 1) -> None:
        """Keep a copy of the weight reordered into oneDNN's blocked layout (CPU only).

        oneDNN's kernels then stream it at near the read bandwidth at every batch size — about 2x
        BLAS for a decode step and prefill alike — at the price of a second copy of the weight.
        ``rows`` is the batch the layout is tuned for. Used only without autograd and while the
        weight is unchanged (its version counter is checked), so training never sees a stale copy.
        """
        w = self.weight
        if w.device.type != "cpu":
            raise ValueError("packed weights are for CPU: oneDNN's blocked layout")
        check_packable(w.dtype)
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_size=rows)
        ptr = w.data_ptr()
        _PACKED[ptr] = (packed, weakref.ref(w), w._version)
        weakref.finalize(w, _PACKED.pop, ptr, None)  # the copy goes when the weight does

    def unpack(self) -> None:
        _PACKED.pop(self.weight.data_ptr(), None)

    @property
    def is_packed(self) -> bool:
        return _packed_for(self.weight) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            plain_fp32 = x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            if ONEDNN_TRAINING and plain_fp32 and not torch.compiler.is_compiling():
                return OneDNNLinear.apply(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # the registry is looked up at run time, inside the op
            return gemv(x, self.weight, self.bias) if use_gemv(x) else _linear_packed_op(x, self.weight, self.bias)
        return linear_packed(x, self.weight, self.bias) if _PACKED else F.linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module, rows: int = 1) -> int:
    """``Linear.pack`` every Linear of ``model``; returns the bytes the packed copies take."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            m.pack(rows)
            total += m.weight.numel() * m.weight.element_size()
    return total


def unpack_linears(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Linear):
            m.unpack()
