"""lucidlm's own CPU kernels for quantized linears (kernels/quantized_matmul.cpp): ``q4_linear`` and
``q8_linear`` (torch.ops.lucidlm_quant), built once per machine by torch's C++ extension builder (g++, ~20 s, kept
in torch's extension cache) and registered as torch operators, so that compiled decode steps call them too.

Why our own: torch's int8/int4 weight kernels stream 5-6 GB/s of integers on a 2-core AVX2 machine where the
float32 product streams 15 (../shared/DESIGN.md), and none holds int8 in groups of 32 (GGUF's Q8_0). These
stream 13-14 GB/s from one large weight at one row (figures in the kernel's header comment and DESIGN.md).

They need an x86-64 CPU with AVX2, FMA and F16C (torch's CPU capability AVX2 or better) and a C++ compiler;
elsewhere ``available()`` is False and quantized layers use torch's kernels (model/quantized_linear.py).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "kernels" / "quantized_matmul.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's libgomp)
DISABLE = "LUCIDLM_CPU_KERNELS"  # set to 0 to use torch's kernels instead


def cpu_supports() -> bool:
    """Whether this CPU runs the kernels' instructions (AVX2 machines also have FMA and F16C)."""
    return platform.machine().lower() in ("x86_64", "amd64") and \
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def available() -> bool:
    """Build (first call on a machine) and load the kernels; False, with a warning saying why, where they cannot
    run. ``LUCIDLM_CPU_KERNELS=0`` turns them off."""
    if os.environ.get(DISABLE, "1") == "0" or not cpu_supports():
        return False
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(name="lucidlm_quantized_matmul", sources=[str(SOURCE)], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, ImportError) as e:  # no compiler, or it failed: torch's kernels still run
        warnings.warn(f"lucidlm's quantized CPU kernels could not be built ({str(e).splitlines()[0]}); "
                      "quantized layers use torch's slower kernels", stacklevel=2)
        return False
    _register_shapes()
    return True


def _register_shapes() -> None:
    """Output shapes for tracing (torch.compile runs these instead of the kernels)."""

    @torch.library.register_fake("lucidlm_quant::q4_linear")
    def _(x, qweight, scale, minimum):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("lucidlm_quant::q8_linear")
    def _(x, qweight, scale):
        return x.new_empty(x.shape[0], qweight.shape[0])


def q4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """x (rows, in) float32 · Ŵᵀ, Ŵ = scale·q + minimum per block of 32; qweight (out, in / 2) uint8, byte j of a
    block holding q_j in its low nibble and q_{j+16} in its high one (GGUF's order); scale, minimum (out, in / 32)
    float16 held as int16 bit patterns. -> (rows, out) float32."""
    return torch.ops.lucidlm_quant.q4_linear(x, qweight, scale, minimum)


def q8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (rows, in) float32 · Ŵᵀ, Ŵ = scale·q; qweight (out, in) int8, scale (out, in / 32) or (out, 1): float16
    per block of 32 or per row, held as int16 bit patterns. -> (rows, out) float32."""
    return torch.ops.lucidlm_quant.q8_linear(x, qweight, scale)
