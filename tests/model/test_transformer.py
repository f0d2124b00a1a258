"""The whole model: causality, prefix-LM, padding, sliding windows, norm placements, hidden states
and the MoE auxiliary loss, each checked against an independent computation."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import lucidlm
from lucidlm.config import ModelConfig
from lucidlm.model.absolute_positions import sinusoidal_table
from lucidlm.model.alibi import alibi_bias, alibi_slopes
from lucidlm.model.masks import build_mask
from lucidlm.model.mlp import MLP
from lucidlm.model.moe import MoE
from lucidlm.model.transformer import Block, ModelOutput, Transformer

CONFIGS = {
    "rope": ("llama3-8b", {}),
    "alibi": ("bloom-560m", {}),
    "learned": ("gpt2", {}),
    "sinusoidal": ("gpt2", dict(positions="sinusoidal")),
    "mla_moe": ("deepseek-v3", {}),
    "mla_moe_v2": ("deepseek-v2-lite", {}),
}


def model_for(preset: str, seed: int = 0, **overrides) -> Transformer:
    cfg = lucidlm.from_preset(preset, tiny=True, **overrides)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def ids(b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def changed_after(x: torch.Tensor, start: int, seed: int = 7) -> torch.Tensor:
    y = x.clone()
    y[:, start:] = (x[:, start:] + 1 + torch.randint(0, 200, y[:, start:].shape,
                                                     generator=torch.Generator().manual_seed(seed))) % 256
    return y


def same(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_future_tokens_never_change_earlier_logits(name):
    preset, overrides = CONFIGS[name]
    model = model_for(preset, **overrides)
    x = ids(2, 12)
    base = model(x)
    for cut in (1, 5, 11):
        out = model(changed_after(x, cut))
        assert same(out[:, :cut], base[:, :cut]), f"position < {cut} saw the future"
        assert not same(out[:, cut:], base[:, cut:])  # the changed positions themselves do change


@pytest.mark.parametrize("name", ["rope", "alibi", "mla_moe"])
@torch.no_grad()
def test_prefix_lm(name):
    preset, overrides = CONFIGS[name]
    model = model_for(preset, **overrides)
    s, p = 10, 5
    x = ids(2, s)
    prefix = torch.zeros(2, s, dtype=torch.bool)
    prefix[:, :p] = True
    base = model(x, prefix_mask=prefix)

    later_prefix = x.clone()
    later_prefix[:, 3] = (x[:, 3] + 17) % 256
    out = model(later_prefix, prefix_mask=prefix)
    assert not same(out[:, 1], base[:, 1])  # an early prefix token sees a later prefix token
    assert not same(out[:, 0], base[:, 0])
    assert same(model(later_prefix)[:, :3], model(x)[:, :3])  # control: without the prefix mask it does not

    for cut in (p, p + 2):  # post-prefix tokens are seen by no earlier token, prefix or not
        out = model(changed_after(x, cut), prefix_mask=prefix)
        assert same(out[:, :cut], base[:, :cut])


@pytest.mark.parametrize("name", ["rope", "alibi", "learned", "mla_moe"])
@torch.no_grad()
def test_left_padding_does_not_change_real_token_logits(name):
    preset, overrides = CONFIGS[name]
    model = model_for(preset, **overrides)
    x = ids(1, 8)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    attention_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    out = model(padded, attention_mask=attention_mask)
    torch.testing.assert_close(out[:, 3:], model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_relative_positions_ignore_a_shift_absolute_ones_do_not(name):
    preset, overrides = CONFIGS[name]
    model = model_for(preset, **overrides)
    x = ids(2, 9)
    shifted = model(x, position_ids=torch.arange(9).expand(2, 9) + 13)
    if model.config.positions in ("rope", "alibi"):
        torch.testing.assert_close(shifted, model(x), rtol=0, atol=1e-5)
    else:
        assert not torch.allclose(shifted, model(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_sliding_window_limits_the_receptive_field():
    model = model_for("mistral-7b", sliding_window=3)  # 2 layers: a token sees 2·(3−1) = 4 tokens back
    x = ids(1, 12)
    base = model(x)
    y = x.clone()
    y[:, 2] = (x[:, 2] + 5) % 256
    out = model(y)
    diff = (out - base).abs().amax(-1)[0]
    assert (diff[:2] == 0).all()  # causal
    assert (diff[2:7] > 1e-6).all()  # within reach through two windowed layers
    assert (diff[7:] <= 1e-6).all()  # out of reach
    full = model_for("mistral-7b", sliding_window=None)
    full.load_state_dict(model.state_dict())
    assert ((full(y) - full(x)).abs().amax(-1)[0, 7:] > 1e-6).all()  # without the window they are reached
    only_first = model_for("mistral-7b", sliding_window=3, sliding_layers=(0,))
    only_first.load_state_dict(model.state_dict())
    assert [b.sliding for b in only_first.blocks] == [True, False]
    assert ((only_first(y) - only_first(x)).abs().amax(-1)[0, 7:] > 1e-6).all()  # block 1 attends fully


@pytest.mark.parametrize("moe", [dict(first_dense_layers=1), dict(layer_freq=2), dict(dense_layers=(0, 3))])
def test_moe_blocks_are_placed_where_the_config_says(moe):
    model = model_for("mixtral-8x7b", n_layers=4, moe=moe)
    first, freq, dense = moe.get("first_dense_layers", 0), moe.get("layer_freq", 1), moe.get("dense_layers", ())
    for i, block in enumerate(model.blocks):
        expect_moe = i >= first and i not in dense and (i + 1) % freq == 0
        assert isinstance(block.mlp, MoE) == expect_moe, i
        assert isinstance(block.mlp, MLP) != expect_moe


# --- one block, each norm placement ------------------------------------------------------------
def naive_norm(cfg: ModelConfig, module, x):
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * module.weight
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + cfg.norm_eps) * module.weight + module.bias


def random_block(cfg: ModelConfig) -> tuple[Block, torch.Tensor, torch.Tensor]:
    """Block 0 of ``cfg`` in float64 with large random weights (norms are not identities), an input and a mask."""
    block = Block(cfg, 0).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.5)
    return block, torch.randn(2, 6, cfg.dim, dtype=torch.float64) * 2, build_mask(6, 6, batch=2)


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_placement_equals_formula(placement, norm):
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, vocab_size=16, n_layers=1, ffn_dim=48, positions="none",
                      norm=norm, norm_placement=placement)
    block, x, mask = random_block(cfg)

    def attn(h):
        return block.attn(h, None, mask)

    def n(name, h):
        return naive_norm(cfg, getattr(block, name), h)

    if placement == "pre":  # x + f(norm(x))
        h = x + attn(n("attn_norm", x))
        expected = h + block.mlp(n("mlp_norm", h))
    elif placement == "post":  # norm(x + f(x))
        h = n("attn_norm", x + attn(x))
        expected = n("mlp_norm", h + block.mlp(h))
    else:  # x + norm(f(norm(x)))
        h = x + n("attn_post_norm", attn(n("attn_norm", x)))
        expected = h + n("mlp_post_norm", block.mlp(n("mlp_norm", h)))
    out, aux = block(x, None, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # RMSNorm computes in float32
    assert aux is None


# --- hidden states and the aux loss -----------------------------------------------------------
@pytest.mark.parametrize("name", ["rope", "alibi", "learned", "sinusoidal"])
@torch.no_grad()
def test_hidden_layers_are_the_residual_after_each_block(name):
    preset, overrides = CONFIGS[name]
    model = model_for(preset, n_layers=3, **overrides)
    cfg = model.config
    x = ids(2, 7)
    out = model.forward_outputs(x, hidden_layers=(0, 1, 2))
    assert isinstance(out, ModelOutput) and sorted(out.hidden_states) == [0, 1, 2]

    # replay the stack by hand, building the position inputs independently
    pos = torch.arange(7).expand(2, 7)
    h = model.embed(x)
    if cfg.positions == "learned":
        h = h + model.positions.weight[pos]
    if cfg.positions == "sinusoidal":
        h = h + sinusoidal_table(cfg.max_seq_len, cfg.dim)[pos]
    if cfg.embed_norm:
        h = model.embed_norm(h)
    rope = model.rotary(pos, h.dtype) if cfg.positions == "rope" else None
    bias = alibi_bias(alibi_slopes(cfg.n_heads), pos, pos) if cfg.positions == "alibi" else None
    mask = build_mask(7, 7, batch=2)
    for i, block in enumerate(model.blocks):
        h, _ = block(h, rope, mask, bias)
        torch.testing.assert_close(out.hidden_states[i], h)
    torch.testing.assert_close(out.logits, model.norm(h) @ model.lm_head.weight.T)

    neg = model.forward_outputs(x, hidden_layers=(-1, -3))
    assert sorted(neg.hidden_states) == [0, 2]
    torch.testing.assert_close(neg.hidden_states[2], out.hidden_states[2])
    torch.testing.assert_close(neg.hidden_states[0], out.hidden_states[0])
    assert isinstance(model(x), torch.Tensor)  # forward: always the logits alone
    torch.testing.assert_close(model(x), out.logits)
    assert model.check_hidden_layers([-1, 0, 2]) == {0, 2}
    for bad in (3, -4):  # no silent wrap-around past the last block
        with pytest.raises(IndexError):
            model.forward_outputs(x, hidden_layers=(bad,))


@torch.no_grad()
def test_aux_loss_is_the_sum_of_mixtral_losses_of_the_moe_layers():
    model = model_for("mixtral-8x7b", n_layers=3)
    router_inputs = []
    for block in model.blocks:
        assert isinstance(block.mlp, MoE)
        block.mlp.gate.register_forward_hook(lambda mod, inp, out: router_inputs.append((mod, inp[0])))
    out = model.forward_outputs(ids(2, 9), return_aux_loss=True)
    assert len(router_inputs) == 3
    expected = sum(load_balancing_loss_func((x @ mod.weight.T,), 8, 2) for mod, x in router_inputs)
    torch.testing.assert_close(out.aux_loss, expected)


@torch.no_grad()
def test_aux_loss_only_for_moe_configs():
    dense = model_for("llama3-8b")
    out = dense.forward_outputs(ids(1, 5), return_aux_loss=True)
    assert isinstance(out, ModelOutput) and out.aux_loss is None
    moe = model_for("deepseek-v3")  # first block dense, the second MoE
    assert isinstance(moe.blocks[0].mlp, MLP) and isinstance(moe.blocks[1].mlp, MoE)
    out = moe.forward_outputs(ids(1, 5), return_aux_loss=True)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and out.aux_loss > 0


# --- embeddings and output -----------------------------------------------------------------
@torch.no_grad()
def test_tied_embeddings_share_one_matrix():
    model = model_for("gpt2")
    assert model.lm_head.weight is model.embed.weight
    assert model_for("llama3-8b").lm_head.weight is not model_for("llama3-8b").embed.weight


@torch.no_grad()
def test_logit_softcap_and_embed_scale_follow_their_formulas():
    plain = model_for("llama3-8b")
    capped = model_for("llama3-8b", logit_softcap=0.05)
    capped.load_state_dict(plain.state_dict())
    x = ids(1, 6)
    raw = plain(x)
    torch.testing.assert_close(capped(x), torch.tanh(raw / 0.05) * 0.05)
    assert capped(x).abs().max() <= 0.05 < raw.abs().max()

    scaled = model_for("llama3-8b", embed_scale=True)
    scaled.load_state_dict(plain.state_dict())
    out = scaled.forward_outputs(x, hidden_layers=(0,))
    pos = torch.arange(6)[None]
    h, _ = plain.blocks[0](plain.embed(x) * 8.0, plain.rotary(pos, torch.float32), build_mask(6, 6))  # sqrt(64)
    torch.testing.assert_close(out.hidden_states[0], h)


@torch.no_grad()
def test_init_weights_scales_residual_output_projections():
    model = model_for("llama3-8b", n_layers=4, dim=128, ffn_dim=256)
    std = model.config.init_std
    o = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks])
    q = torch.cat([b.attn.q_proj.weight.flatten() for b in model.blocks])
    assert float(o.std()) == pytest.approx(std / (2 * 4) ** 0.5, rel=0.05)
    assert float(q.std()) == pytest.approx(std, rel=0.05)
    assert all(torch.equal(b.attn_norm.weight, torch.ones(128)) for b in model.blocks)
