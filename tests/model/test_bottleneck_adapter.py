"""Bottleneck adapters (Houlsby): one adapter against its formula, the block against a hand-written composition
(pre- and post-norm, MoE), identity at init, only adapters (and optionally norms) train, KV cache, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import tiny_model

from lucidlm.model.bottleneck_adapter import (
    BottleneckAdapter,
    BottleneckConfig,
    adapter_state_dict,
    adapters,
    apply_bottleneck,
)
from lucidlm.model.kv_cache import KVCache
from lucidlm.model.lora import LoRAConfig, apply_lora
from lucidlm.model.norm import norm_parameters

IDS = torch.tensor([[3, 9, 4, 1, 7, 2, 8]])


def randomize(model, std: float = 0.3) -> None:
    with torch.no_grad():
        for _, a in adapters(model):
            for p in a.parameters():
                p.normal_(0, std)


def test_one_adapter_is_the_formula():
    torch.manual_seed(0)
    a = BottleneckAdapter(dim=12, size=3, activation="gelu")
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.5)
    h = torch.randn(2, 5, 12)
    w_down, b_down, w_up, b_up = a.down.weight, a.down.bias, a.up.weight, a.up.bias
    expected = h + F.gelu(h @ w_down.T + b_down) @ w_up.T + b_up
    torch.testing.assert_close(a(h), expected, rtol=1e-6, atol=1e-6)
    assert w_down.shape == (3, 12) and w_up.shape == (12, 3)


def test_identity_at_init_and_only_adapters_train():
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS)
    apply_bottleneck(model, BottleneckConfig(size=4))
    with torch.no_grad():
        assert torch.equal(model(IDS), base)  # W_up = 0, b_up = 0: a(h) = h exactly
    d, n = model.config.dim, model.config.n_layers
    trainable = {n_: p for n_, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(adapter_state_dict(model)) and all("_adapter." in k for k in trainable)
    assert sum(p.numel() for p in trainable.values()) == n * 2 * (2 * d * 4 + 4 + d)
    randomize(model)
    model.train()
    model(IDS).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_train_norms_unfreezes_exactly_the_norms():
    model = apply_bottleneck(tiny_model(), BottleneckConfig(size=2, places=("mlp",), layers=[1], train_norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = set(norm_parameters(model))
    assert norms == {"blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "blocks.1.attn_norm.weight",
                     "blocks.1.mlp_norm.weight", "norm.weight"}
    assert trainable == norms | {f"blocks.1.mlp_adapter.{x}.{y}" for x in ("down", "up") for y in ("weight", "bias")}
    assert model.blocks[0].attn_adapter is model.blocks[0].mlp_adapter is model.blocks[1].attn_adapter is None


@pytest.mark.parametrize("preset, placement", [("llama-125m", "pre"), ("llama-125m", "post"),
                                               ("mixtral-8x7b", "pre")])
def test_block_is_the_hand_written_composition(preset, placement):
    model = tiny_model(preset, norm_placement=placement)
    apply_bottleneck(model, BottleneckConfig(size=3, activation="relu"))
    randomize(model)
    block = model.blocks[0]
    x = torch.randn(1, 5, model.config.dim)
    rope = model.rotary(torch.arange(5)[None], x.dtype)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    a_attn, a_mlp = block.attn_adapter, block.mlp_adapter

    def ffn(h):
        out = block.mlp(h)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        if placement == "post":
            x1 = block.attn_norm(x + a_attn(block.attn(x, rope, mask)))
            expected = block.mlp_norm(x1 + a_mlp(ffn(x1)))
        else:
            x1 = x + a_attn(block.attn(block.attn_norm(x), rope, mask))
            expected = x1 + a_mlp(ffn(block.mlp_norm(x1)))
        torch.testing.assert_close(block(x, rope, mask)[0], expected, rtol=1e-5, atol=1e-5)
        assert (expected - block.attn_norm(x)).abs().max() > 1e-2


def test_cached_decode_equals_the_uncached_forward():
    model = tiny_model(seed=3)
    apply_bottleneck(model, BottleneckConfig(size=4))
    randomize(model, 0.2)
    seq = [5, 9, 2, 7, 1, 4, 8]
    cache = KVCache(model.config, n_slots=1, max_len=16)
    with torch.no_grad():
        model(torch.tensor([seq[:-1]]), cache=cache)
        step = model(torch.tensor([seq[-1:]]), cache=cache, last_only=True)[0, -1]
        torch.testing.assert_close(step, model(torch.tensor([seq]))[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, message", [
    (BottleneckConfig(size=0), "size must be an integer >= 1"),
    (BottleneckConfig(activation="swish"), r"activation 'swish' unknown; choose from \["),
    (BottleneckConfig(places=("ffn",)), r"places must be distinct names from \['attn', 'mlp'\]"),
    (BottleneckConfig(layers=[2]), r"layers \[2\] out of range for a model of 2 blocks"),
])
def test_bad_config_fails_before_the_model_changes(config, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        apply_bottleneck(model, config)
    assert not list(adapters(model)) and all(p.requires_grad for p in model.parameters())


def test_one_adapter_at_a_time():
    model = apply_lora(tiny_model(), LoRAConfig(r=2, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_bottleneck(model, BottleneckConfig())
    model = apply_bottleneck(tiny_model(), BottleneckConfig(size=2))
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_bottleneck(model, BottleneckConfig())
    with pytest.raises(ValueError, match="already carries bottleneck adapters"):
        apply_lora(model, LoRAConfig(r=2))
