"""`lucidlm bench --serve` end to end on a small checkpoint: every level streams exactly the tokens it asked
for, with one time-to-first-token per request and one inter-token gap per later token (no timing asserts)."""

from __future__ import annotations

from waiting import HANG_GUARD

from lucidlm.apps.bench_serve import run_serve_bench, serve_table
from lucidlm.random_checkpoint import build_random_checkpoint


def test_levels_count_every_request_and_token(tmp_path):
    model = build_random_checkpoint(tmp_path / "ck")
    levels = run_serve_bench(model, clients=(1, 3), requests_per_client=2, prompt=16, new=5, print_fn=lambda s: None,
                             start_timeout=HANG_GUARD)
    assert [lv.clients for lv in levels] == [1, 3]
    for lv in levels:
        assert lv.requests == 2 * lv.clients and lv.tokens == 5 * lv.requests
        assert len(lv.ttft_s) == lv.requests and len(lv.itl_s) == 4 * lv.requests
        assert lv.wall_s > 0 and lv.bound_tok_s > 0
    table = serve_table(levels, 16, 5)
    assert table.count("\n| ") == 2 and "\n| 1 | 2 | 10 |" in table and "\n| 3 | 6 | 30 |" in table
