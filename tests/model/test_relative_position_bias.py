"""T5's relative position bias against transformers' T5 (buckets, compute_bias, a decoder-only T5 stack), and the
same model generating through the KV-cached engine (eager and compiled) as it does recomputing every step."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_model
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention, T5Stack

from lucidlm.checkpoint.loader import load_model, save_model
from lucidlm.config import ModelConfig, from_preset
from lucidlm.generate.compiled_steps import CompiledSteps
from lucidlm.generate.engine import Engine
from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.offline import Generator
from lucidlm.generate.reference import greedy_no_cache
from lucidlm.model.kv_cache import KVCache
from lucidlm.model.relative_position_bias import RelativePositionBias, relative_position_bucket
from lucidlm.model.transformer import Transformer

# (bidirectional, num_buckets, max_distance): T5's own, small tables whose log buckets a short sequence reaches
BUCKETINGS = [(True, 32, 128), (False, 32, 128), (True, 8, 12), (False, 8, 12), (False, 4, 3), (True, 16, 9)]
T5_SMALL_BUCKETS = dict(relative_num_buckets=8, relative_max_distance=8)  # causal: 4 exact + 4 log buckets up to 8
PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [64, 2], [11, 12, 13, 14]]  # batched: left padding of 5 and 3
NEW = 8  # 7 + 8 positions: distances past max_distance=8 (the last, shared bucket)


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKETINGS)
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-3 * max_distance, 3 * max_distance + 1)  # both signs, well past max_distance
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                                                   max_distance=max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == num_buckets - 1  # the distances past max_distance reach the last bucket


def t5_config(bidirectional: bool, num_buckets: int = 8, max_distance: int = 12, **overrides) -> T5Config:
    """A tiny random T5 config; ``is_decoder`` is what makes T5 bucket causally."""
    base = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, dropout_rate=0.0,
                relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
                is_decoder=not bidirectional, use_cache=False, feed_forward_proj="relu", layer_norm_epsilon=1e-6)
    return T5Config(**{**base, **overrides})


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKETINGS)
def test_bias_equals_transformers_compute_bias(bidirectional, num_buckets, max_distance):
    torch.manual_seed(1)
    t5 = T5Attention(t5_config(bidirectional, num_buckets, max_distance), has_relative_attention_bias=True,
                     layer_idx=0)
    ours = RelativePositionBias(4, num_buckets, max_distance, bidirectional)
    ours.table.weight.data.copy_(t5.relative_attention_bias.weight)
    q_len, k_len = 5, 3 * max_distance
    # a prefill of the whole sequence, queries at the end of longer keys, and one decode step at position k_len - 1
    for q, past in ((k_len, 0), (q_len, k_len - q_len), (1, k_len - 1)):
        theirs = t5.compute_bias(q, k_len, past_seen_tokens=past)  # (1, heads, q, k)
        got = ours(torch.arange(past, past + q)[None], torch.arange(k_len)[None])
        torch.testing.assert_close(got, theirs, rtol=0, atol=0)


def lucidlm_t5_decoder(hf: T5Config) -> ModelConfig:
    """The decoder-only lucidlm config of a T5 decoder stack: RMSNorm pre-norm, ReLU FFN, unscaled q·k."""
    return ModelConfig(vocab_size=hf.vocab_size, dim=hf.d_model, n_layers=hf.num_layers, n_heads=hf.num_heads,
                       head_dim=hf.d_kv, ffn_dim=hf.d_ff, max_seq_len=64, positions="relative_bias",
                       relative_num_buckets=hf.relative_attention_num_buckets,
                       relative_max_distance=hf.relative_attention_max_distance, attn_scale=1.0,
                       norm="rmsnorm", norm_eps=hf.layer_norm_epsilon, activation="relu", gated_mlp=False)


def copy_t5_weights(stack: T5Stack, model: Transformer) -> None:
    ours = {"embed.weight": stack.embed_tokens.weight, "norm.weight": stack.final_layer_norm.weight,
            "relative_position_bias.table.weight": stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight}
    for i, block in enumerate(stack.block):
        attn, ffn = block.layer[0], block.layer[-1]  # a decoder block: [self, cross, ffn]
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            ours[f"blocks.{i}.attn.{b}.weight"] = getattr(attn.SelfAttention, a).weight
        ours[f"blocks.{i}.attn_norm.weight"] = attn.layer_norm.weight
        ours[f"blocks.{i}.mlp.up_proj.weight"] = ffn.DenseReluDense.wi.weight
        ours[f"blocks.{i}.mlp.down_proj.weight"] = ffn.DenseReluDense.wo.weight
        ours[f"blocks.{i}.mlp_norm.weight"] = ffn.layer_norm.weight
    model.load_state_dict({k: v.detach() for k, v in ours.items()}, strict=False)
    missing = set(model.state_dict()) - set(ours) - {"lm_head.weight"}
    assert not missing, missing


@torch.no_grad()
def test_decoder_stack_equals_transformers_t5_decoder():
    """A T5 decoder stack run without an encoder (no cross-attention) is a decoder-only T5: every block's output
    and the final norm equal lucidlm's with positions='relative_bias', over distances past max_distance."""
    torch.manual_seed(2)
    hf = t5_config(bidirectional=False)
    stack = T5Stack(hf).eval()
    with torch.no_grad():  # T5's init leaves the bias table near zero; make it matter
        stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    model = Transformer(lucidlm_t5_decoder(hf)).eval()
    copy_t5_weights(stack, model)
    ids = torch.randint(0, hf.vocab_size, (2, 30))
    theirs = stack(input_ids=ids, output_hidden_states=True)
    out = model.forward_outputs(ids, hidden_layers=range(hf.num_layers))
    for i in range(hf.num_layers - 1):  # hidden_states[0] is the embedding, the last one is after the final norm
        torch.testing.assert_close(out.hidden_states[i], theirs.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.norm(out.hidden_states[hf.num_layers - 1]), theirs.last_hidden_state,
                               rtol=1e-5, atol=1e-5)


def relative_bias_model(seed: int = 0, **overrides) -> Transformer:
    return tiny_model("llama-125m", seed=seed, positions="relative_bias", attn_scale=1.0,
                      **{**T5_SMALL_BUCKETS, **overrides})


def test_one_table_shared_by_every_layer():
    model = relative_bias_model()
    tables = [name for name, _ in model.named_parameters() if "relative" in name]
    assert tables == ["relative_position_bias.table.weight"]  # one table, not one per layer
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda _, args: seen.append(args[3]))  # (x, rope, mask, bias, cache)
    ids = torch.randint(0, 256, (2, 20))
    loss = model(ids).logsumexp(-1).mean()
    assert len(seen) == model.config.n_layers and all(b is seen[0] for b in seen)  # computed once, handed to all
    positions = torch.arange(20)[None].expand(2, 20)
    torch.testing.assert_close(seen[0], model.relative_position_bias(positions, positions))
    loss.backward()  # it trains: the table gets a gradient
    assert model.relative_position_bias.table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cached_greedy_equals_recomputation(bidirectional):
    """Batched, left-padded prompts in prefill chunks of 3, then decode steps: each step's bias is the query's
    position against the cached keys' position ids (padding skipped), as a full forward computes it."""
    model = tiny_model("llama-125m", positions="relative_bias", attn_scale=1.0, relative_bidirectional=bidirectional,
                       **T5_SMALL_BUCKETS)
    got = Generator(model, prefill_chunk=3).generate(PROMPTS, GenerationConfig(max_new_tokens=NEW))
    for prompt, completion in zip(PROMPTS, got):
        assert completion.token_ids == greedy_no_cache(model, prompt, NEW)


@torch.no_grad()
def test_padding_anywhere_is_skipped_with_and_without_the_cache():
    """Distances are counted in position ids, which skip padding: a row with pad tokens inside it gives its real
    tokens the logits of the row without them, in a full forward and chunk by chunk through the KV cache."""
    model = relative_bias_model()
    real = torch.randint(0, 256, (1, 14))
    alone = model(real)[0]
    pads = [4, 5, 6, 12, 13]  # sequence indices of the pad tokens in the padded row of 19
    mask = torch.ones(1, 19, dtype=torch.long)
    mask[0, pads] = 0
    ids = torch.zeros(1, 19, dtype=torch.long)
    ids[mask.bool()] = real[0]
    torch.testing.assert_close(model(ids, attention_mask=mask)[0, mask[0].bool()], alone, rtol=1e-4, atol=1e-4)
    cache = KVCache(model.config, n_slots=1, max_len=19)
    chunks = [model(ids[:, i:i + 3], attention_mask=mask[:, i:i + 3], cache=cache)[0] for i in range(0, 19, 3)]
    torch.testing.assert_close(torch.cat(chunks)[mask[0].bool()], alone, rtol=1e-4, atol=1e-4)


def test_compiled_decode_equals_eager():
    """The compiled step attends over a static bucket of 256 cells, most of them never written: their positions
    must not matter (masked), and the bias must be traced into the one graph."""
    torch._dynamo.reset()
    model = relative_bias_model(seed=3, n_layers=1)  # one block: a smaller graph to compile
    config = GenerationConfig(max_new_tokens=NEW)
    eager = Generator(model).generate(PROMPTS, config)
    compiled = Generator(model, compile=True).generate(PROMPTS, config)
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids
        torch.testing.assert_close(c.logprobs, e.logprobs, atol=1e-4, rtol=0)
    steps = CompiledSteps.for_model(model)
    assert steps.ready and not steps.failed  # the steps ran compiled, none fell back to eager


def test_saved_and_loaded_in_lucidlm_layout(tmp_path):
    model = relative_bias_model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).model
    assert loaded.config.positions == "relative_bias"
    ids = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(loaded(ids), model(ids))


@pytest.mark.parametrize("overrides,message", [
    (dict(relative_num_buckets=1), "relative_num_buckets must be >= 2"),
    (dict(relative_num_buckets=2, relative_bidirectional=True), "relative_num_buckets must be >= 4"),
    (dict(relative_num_buckets=32, relative_max_distance=16), "must exceed the 16 exact-distance buckets"),
    (dict(relative_max_distance=0), "relative_max_distance must be an integer >= 1"),
])
def test_config_refuses_unusable_bucketings(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_preset("llama-125m", tiny=True, positions="relative_bias", **overrides)


def test_engine_refuses_sliding_window_rings():
    model = tiny_model("mistral-7b", positions="relative_bias")
    with pytest.raises(ValueError, match="relative_bias' with sliding-window ring caches is not supported"):
        Engine(model, max_batch=1, max_len=32)
