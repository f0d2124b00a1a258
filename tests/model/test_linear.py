"""Linear and its CPU fast paths (cpu_kernels.py): the packed (oneDNN) path, the compiled matrix-vector path and
the oneDNN training GEMMs equal F.linear."""

import pytest
import torch
import torch.nn.functional as F

from lucidlm.model.cpu_kernels import gemv, is_packed, pack_linears, pack_weight, unpack_linears
from lucidlm.model.linear import Linear

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _layer(dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    return Linear(96, 40, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_f_linear(dtype, rows, bias):
    layer = _layer(dtype, bias)
    x = torch.randn(2, rows, 96).to(dtype)
    if dtype != torch.float32 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(ValueError, match="need a CPU with AVX-512"):  # e.g. an AVX2-only CPU
            pack_weight(layer.weight, rows)
        return
    pack_weight(layer.weight, rows)
    assert is_packed(layer.weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **TOL[dtype])


def test_packed_copy_is_dropped_when_the_weight_changes():
    layer = _layer(torch.float32)
    pack_weight(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step or load_state_dict writes in place
        assert not is_packed(layer.weight)
        x = torch.randn(4, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_training_uses_the_parameter():
    layer = _layer(torch.float32)
    pack_linears(layer)
    layer(torch.randn(3, 96)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    unpack_linears(layer)
    assert not is_packed(layer.weight)


def test_packing_is_cpu_only():
    layer = _layer(torch.float32).to("meta")
    with pytest.raises(ValueError, match="CPU"):
        pack_weight(layer.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_f_linear(dtype):
    layer = _layer(dtype)
    x = torch.randn(1, 1, 96).to(dtype)
    torch.testing.assert_close(gemv(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias), **TOL[dtype])


def test_compiled_one_row_uses_gemv_and_matches(monkeypatch):
    import lucidlm.model.cpu_kernels as cpu_kernels

    traced = []
    monkeypatch.setattr(cpu_kernels, "gemv", lambda *a: traced.append(1) or gemv(*a))
    torch._dynamo.reset()
    layer = _layer(torch.float32)
    x = torch.randn(1, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert not traced  # eager: plain F.linear
        compiled = torch.compile(layer, dynamic=False)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))
    assert traced


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_training_path_matches_f_linear_values_and_gradients(bias):
    from lucidlm.model.cpu_kernels import OneDNNLinear

    torch.manual_seed(0)
    w = torch.randn(40, 96, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    x = torch.randn(3, 7, 96).transpose(0, 1).requires_grad_(True)  # non-contiguous (7, 3, 96)
    g = torch.randn(7, 3, 40)
    y = OneDNNLinear.apply(x, w, b)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    y_ref = F.linear(x, w, b)
    grads_ref = torch.autograd.grad(y_ref, [x, w] + ([b] if bias else []), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_training_forward_uses_onednn_unless_autocast(monkeypatch):
    import lucidlm.model.cpu_kernels as cpu_kernels

    calls = []
    original = cpu_kernels.OneDNNLinear.apply
    monkeypatch.setattr(cpu_kernels.OneDNNLinear, "apply", lambda *a: calls.append(1) or original(*a))
    layer = _layer(torch.float32)
    layer(torch.randn(4, 96)).sum().backward()
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(4, 96)).dtype == torch.bfloat16  # autocast still applies
    assert calls == [1]
