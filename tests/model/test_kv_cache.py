"""KV cache: bytes per token match the formula; slots hold sequences at different lengths."""

import pytest
import torch

from lucidlm.config import from_preset
from lucidlm.model.kv_cache import KVCache, kv_cache_bytes, kv_cache_bytes_per_token
from tests.tiny_lm import tiny_model


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_bytes_per_token_is_2_layers_kv_heads_head_dim(n_kv_heads):
    cfg = from_preset("llama-125m", tiny=True, n_heads=8, n_kv_heads=n_kv_heads)
    expected = 2 * cfg.n_layers * n_kv_heads * cfg.head_dim * 2  # K and V, bfloat16
    assert kv_cache_bytes_per_token(cfg, torch.bfloat16) == expected
    assert kv_cache_bytes_per_token(cfg, torch.float32) == 2 * expected


def test_mla_caches_latent_and_rope_key_only():
    cfg = from_preset("deepseek-v2-lite", tiny=True)
    per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    assert kv_cache_bytes_per_token(cfg, torch.bfloat16) == cfg.n_layers * per_layer * 2
    assert kv_cache_bytes_per_token(cfg) < 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2


def test_published_shapes():
    # Llama-3-8B: 32 layers, 8 KV heads of 128 -> 128 KiB per token in bf16; DeepSeek-V3: 61 · (512 + 64) · 2
    assert kv_cache_bytes_per_token(from_preset("llama3-8b"), torch.bfloat16) == 131072
    assert kv_cache_bytes_per_token(from_preset("deepseek-v3"), torch.bfloat16) == 61 * 576 * 2


@pytest.mark.parametrize("preset", ["llama-125m", "mistral-7b", "deepseek-v2-lite"])
def test_allocated_bytes_equal_the_formula(preset):
    cfg = from_preset(preset, tiny=True)
    cache = KVCache(cfg, n_slots=3, max_len=40, dtype=torch.float32, chunk_size=4)
    assert cache.nbytes() == kv_cache_bytes(cfg, 40, batch=3, dtype=torch.float32, chunk_size=4)
    if cfg.sliding_window is None:
        assert cache.nbytes() == 3 * 40 * kv_cache_bytes_per_token(cfg, torch.float32)


def test_sliding_window_layers_keep_only_the_window():
    cfg = from_preset("mistral-7b", tiny=True, sliding_window=8)
    long = kv_cache_bytes(cfg, 1000, dtype=torch.float32, chunk_size=1)
    assert long == 8 * kv_cache_bytes_per_token(cfg, torch.float32)  # every layer slides: 8 tokens each
    assert KVCache(cfg, 1, 1000 if cfg.max_seq_len >= 1000 else cfg.max_seq_len, chunk_size=1).nbytes() == long


def test_slots_at_different_lengths_decode_together():
    """Sequences that entered the cache separately (as requests joining a running batch do) take
    one decode step together and match the uncached forward of each."""
    model = tiny_model("llama-125m", seed=3)
    seqs = [[5, 9, 2, 7, 1, 4, 8], [3, 6], [11, 12, 13, 14]]
    cache = KVCache(model.config, n_slots=4, max_len=16)
    with torch.no_grad():
        for slot, seq in zip([2, 0, 3], seqs):  # one at a time, into scattered slots
            model(torch.tensor([seq[:-1]]), cache=cache, slots=[slot])
        last = torch.tensor([[s[-1]] for s in seqs])
        step = model(last, cache=cache, slots=[2, 0, 3], last_only=True)[:, -1]
        for i, seq in enumerate(seqs):
            full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(step[i], full, rtol=1e-5, atol=1e-5)
    assert [cache.lengths[s] for s in (2, 0, 3, 1)] == [7, 2, 4, 0]
