"""``lucidlm bench --long`` end to end on its tiny setting: the table's structure, finite perplexities, the plot,
the cached models reused, and the configs each kind is evaluated with."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from lucidlm.apps.bench_long import KINDS, LongBenchConfig, inference_config, long_table, run_long_bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick bench, where the CLI looks for it (runs/bench-long under the working directory)."""
    root = tmp_path_factory.mktemp("bench-long")
    return root, run_long_bench(LongBenchConfig.quick(), root / "runs" / "bench-long", print_fn=lambda s: None,
                                progress=False)


def test_quick_bench_gives_a_finite_table_and_a_plot(quick_run):
    cfg, (_, result) = LongBenchConfig.quick(), quick_run
    table = result["perplexity"]
    assert list(table) == list(KINDS)
    for kind in KINDS:
        assert list(table[kind]) == list(cfg.eval_lens)
        assert all(math.isfinite(p) and 1 < p < 2 * 259 for p in table[kind].values())
    # at the trained length every RoPE kind but DCA (whose chunks are shorter than 16) is plain RoPE
    for kind in ("PI", "NTK", "dynamic NTK", "NTK-by-parts", "YaRN"):
        assert table[kind][cfg.train_len] == pytest.approx(table["none"][cfg.train_len], rel=1e-5)
    text = long_table(result)
    assert text.splitlines()[2] == "| kind | 16 | 32 | 64 |" and len(text.splitlines()) >= 4 + len(KINDS)
    out = tmp_path_of(result)
    assert (out / "long_context.png").stat().st_size > 1000 and (out / "table.md").read_text().startswith("Perp")


def tmp_path_of(result: dict):
    from pathlib import Path

    return Path(result["out"])


def test_each_kind_is_evaluated_with_its_own_config():
    trained = LongBenchConfig().model_config("rope")
    assert inference_config(trained, "none", 1024).rope_scaling.type == "default"
    pi = inference_config(trained, "PI", 1024).rope_scaling
    assert (pi.type, pi.factor, pi.original_max_seq_len) == ("linear", 4.0, 256)
    assert inference_config(trained, "NTK-by-parts", 2048).rope_scaling.factor == 8.0
    assert inference_config(trained, "dynamic NTK", 2048).rope_scaling.factor == 1.0  # grows with the length
    dca = inference_config(trained, "DCA", 2048)
    assert dca.dual_chunk.chunk_size + dca.dual_chunk.local_window <= 256 and dca.rope_scaling.type == "default"
    with pytest.raises(ValueError, match="unknown long-context kind"):
        inference_config(trained, "xpos", 512)


def test_cli_long_quick_reuses_the_trained_models(quick_run, monkeypatch):
    from lucidlm.apps.cli import app

    root, result = quick_run
    checkpoints = {p: p.stat().st_mtime_ns for p in tmp_path_of(result).glob("*/checkpoints/*/*")}
    monkeypatch.chdir(root)
    out = CliRunner().invoke(app, ["bench", "--long", "--quick"])
    assert out.exit_code == 0, out.output
    assert long_table(result).splitlines()[4] in out.output  # the same numbers: the same models, evaluated again
    assert "long_context.png" in out.output
    assert {p: p.stat().st_mtime_ns for p in tmp_path_of(result).glob("*/checkpoints/*/*")} == checkpoints
