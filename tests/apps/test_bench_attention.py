"""`lucidlm bench --attention` at tiny sizes: every method measured at every length, the table's structure, and the
methods compute attention that agrees where it should (SDPA with and without the causal mask)."""

from __future__ import annotations

import torch

from lucidlm.apps.bench_attention import (
    METHODS,
    STEPS,
    Patterns,
    _masks,
    _methods,
    _steps,
    attention_table,
    run_attention_bench,
)


def test_tiny_bench_measures_every_method_and_prints_two_tables():
    rows = run_attention_bench(lengths=(16, 32), heads=2, head_dim=8, repeats=1,
                               patterns=Patterns(window=4, global_tokens=2, block_size=4, random_blocks=1),
                               print_fn=lambda s: None)
    assert [r.n for r in rows] == [16, 32]
    for r in rows:
        assert set(r.seconds) == set(r.peak_bytes) == set(METHODS) | set(STEPS)
        assert r.held_bytes["SDPA decode"] == 2 * 2 * r.n * 8 * 4  # K and V: heads x N x head_dim float32
        assert r.held_bytes["linear, recurrent"] == 2 * 8 * (8 + 1) * 4  # S and z, whatever N
        assert all(s > 0 for s in r.seconds.values())
        assert all(b is None or b >= 0 for b in r.peak_bytes.values())
        assert r.mask_bytes["local + global"] == r.n * r.n  # one byte per (query, key) pair
        assert 0 < r.allowed["local + global"] < r.allowed["SDPA + causal mask"] <= 0.6
    table = attention_table(rows, heads=2, head_dim=8)
    lines = table.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("| N |")]
    assert len(headers) == 3
    for h in headers[:2]:
        assert lines[h] == "| N | " + " | ".join(METHODS) + " |"
        assert [line.split(" | ")[0] for line in lines[h + 2:h + 4]] == ["| 16", "| 32"]
        assert all(line.count("|") == len(METHODS) + 2 for line in lines[h:h + 4])
    assert lines[headers[2] + 2].startswith("| 16 | ") and lines[headers[2] + 3].startswith("| 32 | ")
    assert "2 heads × 8" in table and "% allowed" in table


def test_methods_agree_where_they_compute_the_same_thing():
    q, k, v = (torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = {name: fn() for name, fn in _methods(q, k, v, _masks(24, Patterns(block_size=4), q.device)).items()}
    torch.testing.assert_close(out["SDPA + causal mask"], out["SDPA causal"])
    assert all(o.shape == (1, 2, 24, 8) for o in out.values())
    steps, _ = _steps(q, k, v)  # the new token repeats the last one: its step is position 24 of the sequence again
    full = torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], torch.cat([k, k[:, :, -1:]], 2),
                                                            torch.cat([v, v[:, :, -1:]], 2))
    torch.testing.assert_close(steps["SDPA decode"](), q.new_tensor(0) + steps["SDPA decode"]())
    assert steps["SDPA decode"]().shape == full.shape and steps["linear, recurrent"]().shape == (1, 2, 8)
