import json
import subprocess
import sys

from hf_models import save_hf_model
from typer.testing import CliRunner

from lucidlm.apps.cli import app

runner = CliRunner()


def test_info_describes_a_checkpoint_as_json(tmp_path):
    save_hf_model("deepseek_v2", tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    desc = json.loads(result.stdout)
    assert desc["model_type"] == "deepseek_v2" and desc["attention"] == "MLA" and desc["ffn"] == "MoE"
    assert desc["layers"] == 2 and desc["dim"] == 64


def test_info_counts_parameters_of_a_preset_like_the_model():
    import lucidlm

    result = runner.invoke(app, ["info", "--preset", "gpt2", "--json"])
    assert result.exit_code == 0, result.output
    model = lucidlm.Transformer(lucidlm.from_preset("gpt2"))
    assert json.loads(result.stdout)["parameters"] == model.num_parameters() == 124_439_808  # GPT-2 small
    desc = json.loads(result.stdout)
    # K and V, 12 layers × 12 heads × 64 dims, 2 bytes each (bf16): the KV-cache formula, per token and at 1024
    assert desc["kv_cache_bytes_per_token"] == 2 * 12 * 12 * 64 * 2 == 36_864
    assert desc["kv_cache_bytes_full_context"] == 36_864 * 1024


def test_info_needs_exactly_one_source():
    assert runner.invoke(app, ["info"]).exit_code != 0


def test_bad_checkpoint_exits_with_a_named_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lucidlm", "info", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr
