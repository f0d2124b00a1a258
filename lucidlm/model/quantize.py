"""Quantizing a model's linear layers in place: every ``Linear`` becomes a ``QuantizedLinear``
(model/quantized_linear.py) holding its weight as integers and scales; embeddings, norms, routers and
experts' batched weights stay in the model's float type.
"""

from __future__ import annotations

from torch import nn

from .fused_projections import fuse_projections
from .linear import Linear
from .quantized_linear import QuantizedLinear, QuantScheme, choose_kernel, fits, quantize_weight, scheme

# Linear layers whose weight the model reads directly besides multiplying by it (MLA absorbs kv_b_proj into
# its queries and outputs): they stay float
READ_DIRECTLY = ("kv_b_proj",)
# The output matrix makes every logit, and 4-bit rounding hurts it most: llama.cpp's 4-bit files keep it at 6-8
# bits (Q4_0/Q4_1 presets: Q6_K or Q8_0). int4 gives it Q8_0 where lucidlm's kernels run, per-row int8 elsewhere.
HEAD = "lm_head"


def scheme_of(name: str, s: QuantScheme, in_features: int) -> QuantScheme:
    """The scheme layer ``name`` gets when the model is ``s``-quantized."""
    if name == HEAD and s.bits == 4:
        return scheme("q8_0" if choose_kernel(in_features) == "lucidlm" else "int8")
    return s


def quantizable(name: str, module: nn.Module) -> bool:
    return type(module) is Linear and name.rsplit(".", 1)[-1] not in READ_DIRECTLY


def quantize_model(model: nn.Module, name: str) -> int:
    """Replace every quantizable ``Linear`` of ``model`` by its ``name``-quantized form (round to nearest; the
    head of a 4-bit model at 8 bits, ``scheme_of``), then fuse q/k/v and gate/up (model/fused_projections.py);
    returns how many layers were quantized. Raises before changing anything when a layer's shape does not fit the
    scheme."""
    targets = [(n, m, scheme_of(n, scheme(name), m.in_features)) for n, m in model.named_modules()
               if quantizable(n, m)]
    for n, m, s in targets:
        check_fits(n, m.in_features, m.out_features, s)
    for n, m, s in targets:  # one at a time: the float weight goes as its integers arrive
        q, scale, zero = quantize_weight(m.weight, s)
        replace(model, n, QuantizedLinear(m.in_features, m.out_features, s, m.bias, q, scale.to(m.weight.dtype),
                                          None if zero is None else zero.to(m.weight.dtype)))
    fuse_projections(model)
    return len(targets)


def check_fits(name: str, in_features: int, out_features: int, s: QuantScheme) -> None:
    if not fits(s, in_features, out_features):
        raise ValueError(f"{name} ({out_features}x{in_features}) cannot be {s.name}-quantized: it needs in_features "
                         f"a multiple of {s.group or 1}" + (", and out_features a multiple of 16 with torch's int4 "
                                                            "kernel" if s.bits == 4 else ""))


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized layers' integers and scales."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear)
               for b in m.buffers(recurse=False))


def require_float(model: nn.Module, what: str) -> None:
    """Training needs float weights: name the first quantized layer."""
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            raise ValueError(f"{what} needs float weights, but {n} is {m.scheme.name}-quantized: load the model "
                             "with quantize='none'")


