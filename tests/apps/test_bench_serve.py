"""`lucidlm bench --serve` end to end on a small checkpoint, every scenario scaled down on one server: every level
streams exactly the tokens it asked for, with one time-to-first-token per request and one inter-token gap per later
token; the long-prompt and shared-prefix scenarios give finite numbers and their rows (no timing asserts)."""

from __future__ import annotations

import math

import pytest
from waiting import HANG_GUARD

from lucidlm.apps.bench_serve import run_serve_bench, serve_table
from lucidlm.random_checkpoint import build_random_checkpoint


def test_every_scenario_counts_its_requests_and_tokens(tmp_path):
    model = build_random_checkpoint(tmp_path / "ck")  # context 512: a 300-token long prompt, a 130-token shared head
    bench = run_serve_bench(model, clients=(1, 3), requests_per_client=2, prompt=16, new=5, print_fn=lambda s: None,
                            start_timeout=HANG_GUARD, long_prompt=300, long_clients=3, shared_prefix=130)
    assert [lv.clients for lv in bench.levels] == [1, 3]
    for lv in bench.levels:
        assert lv.requests == 2 * lv.clients and lv.tokens == 5 * lv.requests
        assert len(lv.ttft_s) == lv.requests and len(lv.itl_s) == 4 * lv.requests
        assert lv.wall_s > 0 and lv.bound_tok_s > 0
    lp, sp = bench.long, bench.prefix
    assert lp.streams == 3 and lp.prompt_tokens == 300 and lp.before_itl_s and lp.window_itl_s
    assert all(math.isfinite(x) and x > 0 for x in (bench.library_step_s, lp.ttft_s, lp.stall, sp.ttft_a_s,
                                                      sp.ttft_b_s, sp.ratio))
    assert sp.tokens_saved == 128  # B reuses the two whole 64-token blocks of the head that A left in the cache

    table = serve_table(bench)
    assert "\n| 1 | 2 | 10 |" in table and "\n| 3 | 6 | 30 |" in table  # the levels
    assert "\n| 3 | 300 | " in table and "\n| 130 | 16 | " in table  # the long-prompt and shared-prefix rows
    targets = table[table.index("| target |"):].splitlines()[2:]
    assert [row.split(":")[0] for row in targets] == ["| 1 client", "| 3 streams + one 300-token prompt",
                                                      "| 2nd request sharing a 130-token head"]  # no 8/32 levels
    assert all(math.isfinite(float(row.split(" | ")[1])) for row in targets)


def test_unknown_scenario_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown scenarios"):
        run_serve_bench(scenarios=("levels", "nope"))
