"""Fused projections (model/fused_projections.py): a quantized model's q/k/v and gate/up become one layer each
where the kernel reads rows as stored, and the model's logits stay bit for bit those of its unfused copy; what
cannot be stacked (torch's int4 packing, float layers) stays as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lm import tiny_model

from lucidlm.model import quantize
from lucidlm.model.fused_projections import fuse_projections
from lucidlm.model.quantized_linear import QuantizedLinear, choose_kernel

OURS = choose_kernel(64) == "lucidlm"


def unfused_and_fused(preset: str, name: str, monkeypatch):
    model = tiny_model(preset, seed=0)
    reference = copy.deepcopy(model)
    with monkeypatch.context() as m:
        m.setattr(quantize, "fuse_projections", lambda model: 0)  # the reference: quantized alike, never fused
        quantize.quantize_model(reference, name)
    quantize.quantize_model(model, name)
    return reference, model


@pytest.mark.parametrize("preset", ["llama-125m", "qwen2-0.5b"])  # qwen2: q/k/v biases stacked too
@pytest.mark.parametrize("name", ["int8", "int4"] if OURS else ["int8"])
def test_fused_layers_compute_exactly_what_the_separate_ones_did(preset, name, monkeypatch):
    reference, model = unfused_and_fused(preset, name, monkeypatch)
    n = model.config.n_layers
    for block in model.blocks:
        assert isinstance(block.attn.qkv_proj, QuantizedLinear) and not hasattr(block.attn, "q_proj")
        assert isinstance(block.mlp.gate_up_proj, QuantizedLinear) and not hasattr(block.mlp, "up_proj")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == \
        sum(isinstance(m, QuantizedLinear) for m in reference.modules()) - 3 * n
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    assert fuse_projections(model) == 0  # fused once


def test_layers_that_cannot_be_stacked_stay_separate(monkeypatch):
    model = tiny_model("llama-125m", seed=0)
    for block in model.blocks:  # float layers: their own products
        assert block.attn.qkv_proj is None and block.mlp.gate_up_proj is None
    assert fuse_projections(model) == 0
    torch_int4 = tiny_model("llama-125m", seed=0)
    original = QuantizedLinear.__init__

    def torch_kernel(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "kernel": "torch"})
    monkeypatch.setattr(QuantizedLinear, "__init__", torch_kernel)  # torch's int4 packing interleaves rows
    quantize.quantize_model(torch_int4, "int4")
    attn = torch_int4.blocks[0].attn
    assert attn.qkv_proj is None and attn.q_proj.kernel == "torch" and attn.q_proj.scheme.bits == 4
