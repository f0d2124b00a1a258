import csv
import math
from functools import cache

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from lucidlm.apps import explain_attention_scaling as ex
from lucidlm.apps.cli import app
from lucidlm.checkpoint import local_models


# --- the simulation against closed forms -------------------------------------------------------------------
@cache
def _simulated(d: int) -> torch.Tensor:  # the notes' setting: 64 keys, 2000 trials; drawn once per d for both tests
    return ex.simulate_logits(d, 64, 2000, seed=0)


def _variance_se(d: int, keys: int, trials: int) -> float:
    """Standard error of the pooled variance of q·k: a row's mean square has variance Var|q|² + 2E|q|⁴/m
    = 2d + 2(d² + 2d)/m (|q|² ~ χ²_d; given q the row's logits are iid N(0, |q|²)); rows are independent."""
    return math.sqrt((2 * d + 2 * (d * d + 2 * d) / keys) / trials)


def test_simulated_logit_variance_is_d_k_unscaled_and_1_scaled():
    keys, trials = 64, 2000
    for d in (4, 64, 256):
        raw = _simulated(d)
        assert raw.shape == (trials, keys)
        _, unscaled = ex._stats_row(raw, "simulation", "all", d, False)
        _, scaled = ex._stats_row(raw / math.sqrt(d), "simulation", "all", d, True)
        se = _variance_se(d, keys, trials)
        assert abs(unscaled.logit_var - d) < 4 * se, (d, unscaled.logit_var, se)
        assert abs(scaled.logit_var - 1) < 4 * se / d, (d, scaled.logit_var, se / d)


def test_scaling_keeps_softmax_unsaturated_and_raw_logits_saturate():
    raw = _simulated(256)
    stats_raw, unscaled = ex._stats_row(raw, "simulation", "all", 256, False)
    stats_scaled, scaled = ex._stats_row(raw / 16, "simulation", "all", 256, True)
    for stats in (stats_raw, stats_scaled):
        assert (stats.entropy <= math.log(64) + 1e-9).all() and (stats.entropy >= 0).all()
        assert torch.allclose(stats.log_keys, torch.full_like(stats.log_keys, math.log(64)))
        # keys are exchangeable, so the first one gets 1/keys of the weight on average
        se = stats.first_weight.std().item() / math.sqrt(2000)
        assert abs(stats.first_weight.mean().item() - 1 / 64) < 4 * se
    # scaled: 64 N(0, 1) logits, the largest ~2.4 σ above the rest: about 0.1 of the weight, entropy near log 64
    assert scaled.max_weight < 0.2 and scaled.over_0_9 == 0 and scaled.entropy_fraction > 0.8
    # raw: σ = 16, the top two logits far apart: most rows put > 0.9 on one key
    assert unscaled.max_weight > 0.8 and unscaled.over_0_9 > 0.5 and unscaled.entropy_fraction < 0.15


def test_row_stats_match_a_naive_numpy_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [10.0, 0.0, -10.0, 1.0], [0.3, 0.3, 9.0, -4.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    stats = ex.row_stats(logits, valid)
    for i in range(3):
        x = logits[i].numpy().astype(np.float64)[valid[i].numpy()]
        p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        assert stats.max_weight[i].item() == pytest.approx(p.max(), rel=1e-12)
        assert stats.entropy[i].item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
        assert stats.log_keys[i].item() == pytest.approx(np.log(len(x)))
        assert stats.row_var[i].item() == pytest.approx(x.var(ddof=1), rel=1e-12)
        assert stats.first_weight[i].item() == pytest.approx(p[0], rel=1e-12)  # key 0 is valid in every row here
    moments = ex.Moments()
    moments.add(logits[:2])
    moments.add(logits[2:])
    assert moments.variance == pytest.approx(logits.double().numpy().var(ddof=1), rel=1e-12)
    row = ex.summarize(stats, moments.variance, "x", "all", 4, True)
    max_weights = stats.max_weight.numpy()
    assert row.over_0_9 == pytest.approx((max_weights > 0.9).mean())
    assert row.entropy_fraction == pytest.approx((stats.entropy / stats.log_keys).mean().item())


# --- the real-model path on tiny random models ----------------------------------------------------------------
def _naive_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """(seq, d) rotated in the half layout from the RoPE formula: pairs (i, i + d/2) by angle pos · θ^(-2i/d)."""
    s, d = x.shape
    angle = torch.arange(s, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[:, : d // 2].double(), x[:, d // 2:].double()
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("preset", ["llama-125m", "qwen3-0.6b"])  # GQA; GQA + QK-norm
def test_captured_logits_equal_a_naive_recomputation_and_reproduce_the_attention_output(preset):
    lm = tiny_lm(preset, seed=3)
    cfg, model = lm.config, lm.model
    ids = torch.tensor([lm.encode("the scaled dot product, once more")])
    seen = {}  # the attention's input and output per layer, read by hooks of the test's own
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda m, a, o, i=i: seen.update({i: (a[0][0], o[0])}))
    captured = ex.attention_logits(model, ids)
    s, group = ids.shape[1], cfg.n_heads // cfg.n_kv_heads
    assert [c.layer for c in captured] == list(range(cfg.n_layers))
    for c in captured:
        assert c.qk.shape == (cfg.n_heads, s, s) and c.valid.shape == (s, s) and c.scale == 1 / math.sqrt(cfg.head_dim)
        assert torch.equal(c.valid, torch.ones(s, s, dtype=torch.bool).tril())  # causal
        attn = model.blocks[c.layer].attn
        x, out = seen[c.layer]
        hd = cfg.head_dim
        heads_out = []
        for h in range(cfg.n_heads):
            kv = h // group
            q = x.double() @ attn.q_proj.weight[h * hd:(h + 1) * hd].double().T
            k = x.double() @ attn.k_proj.weight[kv * hd:(kv + 1) * hd].double().T
            v = x.double() @ attn.v_proj.weight[kv * hd:(kv + 1) * hd].double().T
            if cfg.qk_norm:
                q, k = _rms(q, attn.q_norm.weight, cfg.norm_eps), _rms(k, attn.k_norm.weight, cfg.norm_eps)
            qk = _naive_rope(q, cfg.rope_theta) @ _naive_rope(k, cfg.rope_theta).T
            torch.testing.assert_close(c.qk[h].double(), qk, rtol=1e-4, atol=1e-4 * qk.abs().max().item())
            weights = torch.softmax((c.qk[h].double() * c.scale).masked_fill(~c.valid, -math.inf), -1)
            heads_out.append(weights @ v)
        # the captured logits are the ones the model attended with: they rebuild the attention's own output
        rebuilt = torch.cat(heads_out, -1) @ attn.o_proj.weight.double().T
        torch.testing.assert_close(rebuilt, out.double(), rtol=1e-4, atol=1e-4 * out.abs().max().item())
    # the capture left the forward alone
    torch.testing.assert_close(model(ids), model(ids))
    assert all(not b.attn._forward_pre_hooks for b in model.blocks)


def test_measure_model_gives_overall_then_one_row_per_layer_and_scaling():
    lm = tiny_lm("llama-125m", seed=1)
    cfg = ex.ScalingConfig(prompts=("a first prompt, long enough", "and a second one, also long enough"),
                           min_keys=8, progress=False)
    measured = ex.measure_model(lm, cfg, "tiny")
    n = lm.config.n_layers
    assert [(r.layer, r.scaled) for r in measured.rows] == [("all", True), ("all", False)] + [
        (str(i), s) for i in range(n) for s in (True, False)]
    assert all(r.d_k == lm.config.head_dim for r in measured.rows)
    tokens = [len(lm.encode(p)) for p in cfg.prompts]
    rows_per_layer = lm.config.n_heads * sum(t - cfg.min_keys + 1 for t in tokens)  # causal: query p sees p+1 keys
    assert all(r.rows == rows_per_layer for r in measured.rows[2:]) and measured.rows[0].rows == n * rows_per_layer
    # the scaled logits are the raw ones times 1/√d: variance over d
    for scaled, raw in zip(measured.rows[::2], measured.rows[1::2], strict=True):
        assert scaled.logit_var == pytest.approx(raw.logit_var / lm.config.head_dim, rel=1e-9)


def test_plain_attention_only_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alibi"):
        ex.attention_logits(tiny_lm("llama-125m", positions="alibi").model, torch.tensor([[1, 2, 3]]))
    for bad in (dict(keys=1), dict(dims=()), dict(dims=(0,)), dict(trials=1), dict(min_keys=1)):
        with pytest.raises(ValueError):
            ex.ScalingConfig(**bad).check()


def test_a_named_model_not_installed_is_reported_not_loaded(monkeypatch):
    absent = local_models.LocalModel("absent-135m", "lucidlm_no_such_package", "absent==0.1", "a.gguf", 1, "0" * 64)
    monkeypatch.setitem(local_models.LOCAL_MODELS, "absent-135m", absent)
    lm, note = ex.load_real_model("absent-135m", "cpu")
    assert lm is None and "not installed" in note and "absent==0.1" in note


def test_cli_writes_the_csv_and_four_pngs(tmp_path):
    model = tiny_lm("llama-125m").save(tmp_path / "model")  # 2 layers of dim 64: seconds for the 5 prompts
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", "attention-scaling", "--trials", "50", "--keys", "16",
                                      "--dims", "4,16", "--model", str(model), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "q·k/√d_k" in result.output and "per layer" in result.output
    rows = list(csv.DictReader((out / "attention_scaling.csv").open()))
    assert [(r["source"], r["d_k"], r["layer"]) for r in rows[:4]] == [("simulation", "4", "all")] * 2 + [
        ("simulation", "16", "all")] * 2
    assert len(rows) == 4 + 2 + 2 * 2  # the tiny model has 2 layers
    table = (out / "table.md").read_text()
    assert table.count("\n| simulation |") == 4 and table.count("| q·k/√d_k |") == 3  # 2 dims + the model overall
    for name in ("logits", "max_weight", "entropy", "model"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert CliRunner().invoke(app, ["explain", "attention-scaling", "--dims", "4,x"]).exit_code != 0
