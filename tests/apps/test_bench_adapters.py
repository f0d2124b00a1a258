"""`lucidlm bench --adapters` run tiny: one row per method, trainable counts equal to each method's formula (from
what each run saved), the same first loss for all three (same base, data and seed), a table with every row."""

from __future__ import annotations

import torch

from lucidlm.apps.bench_adapters import AdapterBench, adapter_table, run_adapter_bench
from lucidlm.checkpoint import FAMILIES, save_model
from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.random_checkpoint import CHAT_TEMPLATE
from lucidlm.tokenizer import byte_tokenizer


def test_tiny_run_has_every_method_and_the_formulas(tmp_path):
    tok = byte_tokenizer()
    cfg = from_preset("llama-125m", tiny=True, vocab_size=tok.vocab_size, max_seq_len=256, eos_token_id=257,
                      bos_token_id=256, pad_token_id=258)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, tmp_path / "base", FAMILIES["llama"])
    tok.save(tmp_path / "base")
    (tmp_path / "base" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    bench = AdapterBench(steps=2, batch_size=2, max_len=128, lora_r=2, bottleneck_size=3, people=20)
    result = run_adapter_bench(bench, tmp_path / "base", print_fn=lambda s: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["lora", "bottleneck", "full"] and result["total"] == model.num_parameters()
    d, n, h = cfg.dim, cfg.n_layers, cfg.n_heads * cfg.head_dim
    kv, f = cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    lora = n * 2 * ((d + h) + (d + kv) * 2 + (h + d) + 2 * (d + f) + (f + d))
    assert rows["lora"]["trainable"] == lora
    assert rows["bottleneck"]["trainable"] == n * 2 * (2 * d * 3 + 3 + d)
    assert rows["full"]["trainable"] == model.num_parameters()
    assert len({round(r["first_loss"], 5) for r in rows.values()}) == 1  # adapters start as the base model
    assert all(r["s_per_step"] > 0 and r["final_loss"] > 0 for r in rows.values())
    table = adapter_table(result)
    assert table.startswith("| method") and table.count("\n| ") == 3  # header, then one row per method
    assert "loss after 2 steps" in table and "full fine-tuning" in table
