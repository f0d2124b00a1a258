"""Weight-only quantized linears (model/quantized_linear.py): each scheme's kernel equals the product with the
weight its formula describes, computed here from the stored integers and scales; round-to-nearest quantization
stays within half a step of the float weight; model/quantize.py swaps a model's linears and refuses what it cannot
hold or train."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.model import quantized_kernels
from lucidlm.model.quantize import is_quantized, quantize_model, require_float
from lucidlm.model.quantized_linear import KERNEL_DTYPE, SCHEMES, QuantizedLinear, quantize_weight, scheme

OUT, IN = 48, 96  # three groups of 32 per row; rows a multiple of 16 (torch's int4 packing)
# torch's kernels run everywhere; lucidlm's where the CPU has AVX2 (test_lucidlm_kernels_are_built... checks
# that they are built wherever it does)
KERNELS_HERE = ["torch"] + (["lucidlm"] if quantized_kernels.cpu_supports() else [])


def formula(name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Ŵ (out, in) from the scheme's formula, written out: Q8_0/int8 s·q, Q4_0 s·(q − 8), Q4_1/int4 s·q + m."""
    s = scheme(name)
    group = s.group or q.shape[1]
    per = lambda t: t.float().repeat_interleave(group, dim=1)  # noqa: E731 - one value per weight
    if s.bits == 8:
        return q.float() * per(scale)
    if s.asymmetric:
        return q.float() * per(scale) + per(zero)
    return (q.float() - 8) * per(scale)


def stored(name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, kernel: str) -> torch.Tensor:
    """The weight the layer holds. lucidlm's kernels: scales and minimums in float16 (GGUF's), Q4_0's minimum
    −8s. torch's: scales in bfloat16 (their operand), the 4-bit form s·(q − 8) + z; Q8_0 (a float product) keeps
    its scales as given."""
    if kernel == "lucidlm":
        h = lambda t: None if t is None else t.half().float()  # noqa: E731
        return formula(name, q, h(scale), h(zero))
    if name == "q8_0":
        return formula(name, q, scale, zero)
    if name == "int8":
        return formula(name, q, scale.to(KERNEL_DTYPE), zero)
    z = torch.zeros_like(scale) if zero is None else zero + 8 * scale
    bf = lambda t: t.to(KERNEL_DTYPE).float()  # noqa: E731
    return formula("q4_0", q, bf(scale), None) + bf(z).repeat_interleave(32, dim=1)


def int16_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x·wᵀ − x̂·wᵀ| when x̂ is x rounded to 16-bit integers per block of 32 (step max|x_block| / 32767):
    at most half a step per input, times |w|, summed; plus float32's rounding of the sums."""
    blocks = x.view(*x.shape[:-1], -1, 32)
    half_step = (blocks.abs().amax(-1, keepdim=True) / 32767 / 2).expand_as(blocks).reshape(x.shape)
    return half_step.double() @ w.abs().double().t() + 1e-5 * (x.abs().double() @ w.abs().double().t())


@pytest.mark.parametrize("kernel", KERNELS_HERE)
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_the_kernel_equals_the_product_with_the_formulas_weight(name, rows, kernel):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    q, scale, zero = quantize_weight(weight, scheme(name))
    layer = QuantizedLinear(IN, OUT, scheme(name), bias, q, scale, zero, kernel=kernel)
    x = torch.randn(2, rows, IN, generator=g)
    w = stored(name, q, scale, zero, kernel)
    torch.testing.assert_close(layer.dequantize(), w, atol=1e-5, rtol=1e-6)
    got = layer(x) - bias
    assert got.dtype == torch.float32
    if kernel == "lucidlm":  # activations rounded to 16-bit integers per block, float32 sums
        error = (got.double() - x.double() @ w.double().t()).abs()
        assert bool((error <= int16_rounding_bound(x, w)).all()), float(error.max())
    elif name == "q8_0":  # a float32 product (no torch kernel)
        torch.testing.assert_close(got, x @ w.t(), atol=1e-4, rtol=1e-5)
    else:  # torch's kernels take bfloat16 input and round their output to it: exact up to those two roundings
        want = x.to(KERNEL_DTYPE).double() @ w.double().t()
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=2**-8)


def test_lucidlm_kernels_are_built_where_the_cpu_runs_them():
    assert quantized_kernels.available() == quantized_kernels.cpu_supports()
    layer = QuantizedLinear(IN, OUT, scheme("int4"), None, *quantize_weight(torch.randn(OUT, IN), scheme("int4")))
    assert layer.kernel == ("lucidlm" if quantized_kernels.cpu_supports() else "torch")


@pytest.mark.parametrize("kernel", KERNELS_HERE)
def test_the_kernels_read_a_gguf_block_as_llama_cpp_lays_it_out(kernel):
    """Q4_1 bytes written by the gguf package: its dequantization is the layer's weight."""
    from gguf import GGMLQuantizationType, quants

    from lucidlm.checkpoint.gguf import split_blocks

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)).numpy()
    raw = quants.quantize(weight, GGMLQuantizationType.Q4_1)
    q, d, m = (torch.from_numpy(a.copy()) for a in split_blocks(raw.reshape(16, -1), GGMLQuantizationType.Q4_1))
    layer = QuantizedLinear(64, 16, scheme("q4_1"), None, q, d, m, kernel=kernel)
    want = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1))
    torch.testing.assert_close(layer.dequantize(), want, atol=1e-6 if kernel == "lucidlm" else 2e-2, rtol=0)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_round_to_nearest_is_within_half_a_step(name):
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))
    s = scheme(name)
    q, scale, zero = quantize_weight(weight, s)
    step = scale.abs().repeat_interleave(s.group or IN, dim=1)
    error = (formula(name, q, scale, zero) - weight).abs()
    bound = step / 2
    if name == "q4_0":  # llama.cpp's rule maps the extreme to −8: its opposite can reach +8, clamped to +7
        bound = torch.where(q == 15, step, bound)
    assert bool((error <= bound + 1e-6).all())
    levels = (-127, 127) if s.bits == 8 else (0, 15)
    assert q.min() >= levels[0] and q.max() <= levels[1]


@pytest.mark.parametrize("kernel", KERNELS_HERE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["int8", "q8_0", "int4"])
def test_reduced_precision_activations(name, dtype, kernel):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(OUT, IN, generator=g)
    q, scale, zero = quantize_weight(weight, scheme(name))
    zero = None if zero is None else zero.to(dtype)
    layer = QuantizedLinear(IN, OUT, scheme(name), None, q, scale.to(dtype), zero, kernel=kernel)
    x = torch.randn(3, IN, generator=g)
    want = x @ stored(name, q, scale.to(dtype), zero, kernel).t()
    got = layer(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.02)  # activations rounded to 8 / 11 bits


def test_quantizing_a_model_keeps_its_predictions_close():
    model = tiny_model("llama-125m", seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids)
        swapped = quantize_model(model, "int8")
        after = model(ids)
    assert swapped == 7 * model.config.n_layers + 1 and is_quantized(model)  # every projection and the head
    assert type(model.embed).__name__ == "Embedding" and model.embed.weight.dtype == torch.float32  # stays float
    assert float(torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)) > 0.999


def test_a_layer_the_scheme_cannot_hold_is_named_before_anything_changes():
    model = tiny_model("llama-125m", seed=0, ffn_dim=80)  # down_proj's 80 inputs are not whole groups of 32
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.down_proj \(\d+x80\).*int4"):
        quantize_model(model, "int4")
    assert not is_quantized(model)
    with pytest.raises(ValueError, match="unknown quantization 'int3'; supported: int8, q8_0"):
        quantize_model(model, "int3")


def test_a_quantized_model_refuses_training_by_name():
    model = tiny_model("llama-125m", seed=0)
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match=r"fine-tuning needs float weights, but blocks\.0\.attn\.\w+_proj is "
                                         "int8-quantized"):
        require_float(model, "fine-tuning")
    x = torch.randn(1, 3, model.config.dim, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not train"):
        model.blocks[0].attn.o_proj(x)
