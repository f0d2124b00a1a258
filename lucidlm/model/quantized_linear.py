"""Weight-only quantized linear layers: y = x · Ŵᵀ + b, where Ŵ = scale · (q − offset) is kept in memory as the
integers q and one scale (and zero) per group of ``group`` consecutive input weights of an output row.

Decoding one token reads every weight once, so its speed is the bytes of the weights: 8-bit weights read a
quarter of float32's, 4-bit an eighth (plus the scales). Only the weights are integers ("weight-only", as
llama.cpp's CPU path and torchao's int8/int4 weight-only).

Schemes (``QuantScheme``), each the layout of a GGUF type or of ``load(quantize=...)``:

- ``int8`` (``group=0``): symmetric, one scale per output row, Ŵ = s·q, q ∈ [−127, 127].
- ``q8_0``: symmetric int8 in groups of 32 (GGUF Q8_0).
- ``int4`` / ``q4_1``: asymmetric 4-bit in groups of 32, Ŵ = s·q + m, q ∈ [0, 15] (GGUF Q4_1).
- ``q4_0``: symmetric 4-bit in groups of 32, Ŵ = s·(q − 8) (GGUF Q4_0), i.e. Q4_1's formula with m = −8s.

Kernels (``kernel=``), chosen per layer by ``choose_kernel``:

- ``"lucidlm"``, the default on x86 CPUs with AVX2 (model/quantized_kernels.py, kernels/quantized_matmul.cpp):
  blocks of 32 as GGUF lays them out (4-bit: byte j holds q_j and q_{j+16}; float16 scales and minimums), 13-14
  GB/s from one large weight (2-3x torch's kernels here). Activations are rounded to 16-bit integers per block of
  32 inside the kernel (finer than bfloat16); the product is float32 and returned in the input's dtype.
- ``"torch"`` (other CPUs, or ``LUCIDLM_CPU_KERNELS=0``): torch's ``_weight_int8pack_mm`` (int8 per row) and
  ``_weight_int4pack_mm_for_cpu`` (tinygemm's layout, Ŵ = s·(q − 8) + z: Q4_0 is z = 0, Q4_1 is z = m + 8s),
  computing in bfloat16 (``KERNEL_DTYPE``): they are vectorised for bfloat16 activations and take a slow reference
  loop for float32 (measured on a 2-core AVX2 EPYC, one 2048x768 weight at one row: int8 253 us and int4 157 us in
  bfloat16, 1413 and 2103 us in float32). Q8_0 has no torch kernel there: a float product, slower than float.

Scales are stored as float16 bit patterns (int16 buffers), so that ``model.to(dtype)`` leaves them as the kernel
reads them. ``QuantizedLinear.dequantize()`` is Ŵ in float32: the reference the kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import quantized_kernels


@dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int  # 8 or 4
    group: int  # input weights sharing one scale; 0: the whole row
    asymmetric: bool  # a zero (minimum) per group besides the scale


SCHEMES = {s.name: s for s in (
    QuantScheme("int8", 8, 0, False),
    QuantScheme("q8_0", 8, 32, False),
    QuantScheme("int4", 4, 32, True),
    QuantScheme("q4_1", 4, 32, True),
    QuantScheme("q4_0", 4, 32, False),
)}
INT4_TILES = 2  # tinygemm's inner K tiles (the packing torch's CPU kernel expects)
KERNEL_DTYPE = torch.bfloat16  # what torch's int8/int4 CPU kernels are fast in (module docstring)
BLOCK = 32  # input weights per block of lucidlm's kernels
KERNELS = ("lucidlm", "torch")


def scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; supported: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def choose_kernel(in_features: int) -> str:
    """lucidlm's kernels where they run (and the row is whole blocks of 32), else torch's."""
    return "lucidlm" if in_features % BLOCK == 0 and quantized_kernels.available() else "torch"


def fits(s: QuantScheme, in_features: int, out_features: int) -> bool:
    """Whether a layer of this shape can hold ``s``: whole groups, and torch's int4 packing wants rows in 16s."""
    if s.group and in_features % s.group:
        return False
    return not (s.bits == 4 and out_features % 16 and choose_kernel(in_features) == "torch")


class QuantizedLinear(nn.Module):
    """A ``Linear`` whose weight is stored quantized (buffers, not parameters: nothing here trains)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: torch.Tensor | None,
                 q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                 kernel: str | None = None) -> None:
        """``q`` (out, in) integers (int8 for 8 bits; 0..15 for 4), ``scale`` and ``zero``
        (out, in / group) float, per the scheme's formula (module docstring); ``kernel``: one of ``KERNELS``
        (None: ``choose_kernel``)."""
        super().__init__()
        group = scheme.group or in_features
        if in_features % group:
            raise ValueError(f"{scheme.name} needs in_features ({in_features}) divisible by its group of {group}")
        kernel = kernel or choose_kernel(in_features)
        if kernel not in KERNELS:
            raise ValueError(f"unknown quantized kernel {kernel!r}; supported: {', '.join(KERNELS)}")
        if kernel == "lucidlm" and choose_kernel(in_features) != "lucidlm":
            raise ValueError(f"lucidlm's quantized kernels need an AVX2 CPU, a C++ compiler and in_features in 32s "
                             f"(in_features={in_features}); kernel='torch' runs anywhere")
        self.in_features, self.out_features, self.scheme, self.kernel = in_features, out_features, scheme, kernel
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if kernel == "lucidlm":
            self._store_blocks(q, scale, zero)
        else:
            self._store_torch(q, scale, zero)

    def _store_blocks(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """lucidlm's layout: GGUF's blocks, split into integers and float16 scales (as int16 bit patterns)."""
        if self.scheme.bits == 8:
            self.register_buffer("qweight", q.to(torch.int8).contiguous())  # (out, in)
        else:  # (out, in / 2): byte j of a block of 32 holds q_j (low nibble) and q_{j+16} (high nibble)
            g = q.to(torch.uint8).reshape(self.out_features, -1, 2, BLOCK // 2)
            self.register_buffer("qweight", (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(self.out_features, -1))
            minimum = zero if self.scheme.asymmetric else -8 * scale  # Q4_0: s·(q − 8) = s·q − 8s
            self.register_buffer("minimum", float16_bits(minimum))
        self.register_buffer("scale", float16_bits(scale))  # (out, in / group)

    def _store_torch(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """torch's kernels' layouts, their scales in KERNEL_DTYPE."""
        s = self.scheme
        if s.bits == 8:
            self.register_buffer("qweight", q.to(torch.int8).contiguous())  # (out, in)
            # (out, in / group); one per row is the kernel's operand, kept in its dtype as the 4-bit scales are
            self.register_buffer("scale", (scale.to(KERNEL_DTYPE) if s.group == 0 else scale).contiguous())
        else:
            z = zero if zero is not None else torch.zeros_like(scale)  # torch's int4 formula: s·(q − 8) + z
            if s.asymmetric:  # stored as s·q + m: z = m + 8s
                z = z + 8 * scale
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32).contiguous(), INT4_TILES))
            self.register_buffer("scale_zero", torch.stack([scale.t(), z.t()], -1).to(KERNEL_DTYPE).contiguous())

    @property
    def rows_in_order(self) -> bool:
        """Whether every buffer holds output row n at row n (lucidlm's layout, torch's int8); torch's int4 packing
        interleaves rows."""
        return self.kernel == "lucidlm" or self.scheme.bits == 8

    @classmethod
    def stacked(cls, layers: list[QuantizedLinear]) -> QuantizedLinear:
        """One layer whose output rows are ``layers``' in order (alike, ``rows_in_order``): buffers concatenated."""
        first = layers[0]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.scheme, fused.kernel = first.in_features, first.scheme, first.kernel
        fused.out_features = sum(m.out_features for m in layers)
        biases = [m.bias for m in layers]
        fused.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases), requires_grad=False)
        for name, _ in first.named_buffers(recurse=False):
            fused.register_buffer(name, torch.cat([getattr(m, name) for m in layers]))
        return fused

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"kernel={self.kernel}")

    @property
    def group(self) -> int:
        return self.scheme.group or self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"a {self.scheme.name}-quantized linear does not train (its weights are integers); "
                               "load the model without quantize= to fine-tune it")
        rows = x.reshape(-1, self.in_features)
        y = self._lucidlm(rows) if self.kernel == "lucidlm" else self._torch(rows)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _lucidlm(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float().contiguous()
        if self.scheme.bits == 4:
            return quantized_kernels.q4_linear(rows, self.qweight, self.scale, self.minimum)
        return quantized_kernels.q8_linear(rows, self.qweight, self.scale)

    def _torch(self, rows: torch.Tensor) -> torch.Tensor:
        if self.scheme.bits == 4:  # scale_zero: (in / group, out, 2), kept in KERNEL_DTYPE
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(KERNEL_DTYPE), self.qweight, self.group,
                                                              self.scale_zero.to(KERNEL_DTYPE))
        if self.scheme.group == 0:
            return torch.ops.aten._weight_int8pack_mm(rows.to(KERNEL_DTYPE), self.qweight,
                                                      self.scale[:, 0].to(KERNEL_DTYPE))
        # no torch kernel for int8 in groups: a float product (slow; see grouped_int8_linear)
        return grouped_int8_linear(rows, self.qweight, self.scale, self.group)

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in) in float32, from what is stored."""
        out, k = self.out_features, self.in_features
        if self.kernel == "lucidlm":
            scale = self.scale.view(torch.float16).float()
            if self.scheme.bits == 8:
                return (self.qweight.float().view(out, -1, self.group) * scale[..., None]).view(out, k)
            b = self.qweight.view(out, -1, BLOCK // 2)
            q = torch.cat([b & 15, b >> 4], -1).float()  # (out, in / 32, 32)
            return (q * scale[..., None] + self.minimum.view(torch.float16).float()[..., None]).view(out, k)
        if self.scheme.bits == 8:
            return (self.qweight.float().view(out, -1, self.group) * self.scale.float()[..., None]).view(out, k)
        eye = torch.eye(k, dtype=torch.float32, device=self.qweight.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group,
                                                          self.scale_zero.float()).t().contiguous()


def float16_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor as float16, held as its int16 bit patterns (``.view(torch.float16)`` reads it back)."""
    return t.to(torch.float16).contiguous().view(torch.int16)


def grouped_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """x (rows, in) · (scale ⊙ q)ᵀ for int8 q (out, in) with one scale per ``group`` inputs of a row.

    torch has no kernel for it: eagerly the weight is dequantized per call, compiled (one row) inductor fuses the
    dequantization into the reduction; both run at about 1 GB/s of int8 weights here (a quarter of float32's
    speed): a kernel of our own is still to be written."""
    out, k = q.shape
    if torch.compiler.is_compiling() and x.shape[0] == 1:  # decode: one fused loop streaming the int8 weights
        partial = (q.view(out, k // group, group).to(x.dtype) * x.view(1, k // group, group)).sum(-1)  # (out, G)
        return (partial * scale.to(x.dtype)).sum(-1)[None]
    w = (q.view(out, k // group, group).to(x.dtype) * scale.to(x.dtype)[..., None]).view(out, k)
    return F.linear(x, w)


def quantize_weight(weight: torch.Tensor, s: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a float weight (out, in) -> (q, scale, zero) in the scheme's formula."""
    w = weight.detach().float()
    out, k = w.shape
    g = w.view(out, k // (s.group or k), -1)  # (out, groups, group)
    if s.bits == 8:
        scale = g.abs().amax(-1) / 127
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (g / scale[..., None]).round().clamp(-127, 127).to(torch.int8).view(out, k)
        return q, scale, None
    if s.asymmetric:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
        return q.to(torch.int32).view(out, k), scale, lo
    # Q4_0's rule (llama.cpp): the weight of largest magnitude maps to q − 8 = −8 exactly, so s takes its sign
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]
    scale = extreme / -8
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = ((g / scale[..., None]).round() + 8).clamp(0, 15)
    return q.to(torch.int32).view(out, k), scale, None
