"""lucidlm against Hugging Face transformers, offline, on tiny random models of every family.

Each test saves a random transformers model with ``save_pretrained``, loads the directory with
lucidlm and compares outputs with what transformers computes on the same inputs (float32,
atol 1e-4). ``pytest -s`` prints the largest logit difference seen per family.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import FAMILIES
from hf_parity import (
    PAD,
    assert_close,
    hf_checkpoint,
    hf_forward,
    hf_logits,
    left_padded,
    max_diff,
    ours,
    ours_outputs,
    random_hf_model,
    random_ids,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lucidlm.checkpoint import load_model
from lucidlm.model.transformer import Transformer

MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _parity_table():
    yield
    if MAX_DIFFS:
        print("\n\nmax |logit difference| lucidlm vs transformers (float32, weights ~ N(0, 0.3), 2x12 batches)")
        for kind, diff in MAX_DIFFS.items():
            print(f"  {kind:<12} {diff:.3e}")


# --- 1. every family: logits, left padding --------------------------------------------------------
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_logits_match_transformers(kind, tmp_path):
    hf, loaded = hf_checkpoint(kind, tmp_path)
    model = loaded.model
    ids = random_ids()
    diff = assert_close(ours(model, ids), hf_logits(hf, ids))

    padded, mask, positions = left_padded(ids)
    theirs = hf_logits(hf, padded, attention_mask=mask, position_ids=positions)
    mine = ours(model, padded, attention_mask=mask)  # lucidlm derives the same position ids itself
    real = mask.bool()
    diff = max(diff, assert_close(mine[real], theirs[real], what="left-padded logits"))
    MAX_DIFFS[kind] = diff
    print(f"{kind}: max |logit difference| {diff:.3e}")

    alone = ours(model, padded[-1:, PAD:])  # the padded row run on its own, without padding
    assert_close(mine[-1:, PAD:], alone, what="padded row vs the same row alone")


# --- 2. hidden states -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "deepseek_v2"])
def test_hidden_state_after_block_0(kind, tmp_path):
    hf, loaded = hf_checkpoint(kind, tmp_path)
    ids = random_ids()
    out = ours_outputs(loaded.model, ids, hidden_layers=[0])
    theirs = hf_forward(hf, ids, output_hidden_states=True).hidden_states[1]  # [0] is the embedding output
    assert set(out.hidden_states) == {0}
    assert_close(out.hidden_states[0], theirs, what="hidden state after block 0")
    assert_close(out.logits, hf_logits(hf, ids))


# --- 3. RoPE scaling variants -------------------------------------------------------------------------
ROPE = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    # dynamic NTK only changes frequencies past max_position_embeddings: 24 tokens with 16 trained
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
}


@pytest.mark.parametrize("rope", list(ROPE))
def test_rope_scaling_matches_transformers(rope, tmp_path):
    params = ROPE[rope]
    sizes = dict(max_position_embeddings=16) if rope == "dynamic" else {}
    hf, loaded = hf_checkpoint("llama", tmp_path, rope_parameters=params, **sizes)
    assert loaded.config.rope_scaling.type == rope
    ids = random_ids(seq=24)
    theirs = hf_logits(hf, ids)
    assert_close(ours(loaded.model, ids), theirs)
    if rope != "default":  # the scaling is in effect: same weights, unscaled RoPE of the same theta differ
        plain = random_hf_model("llama", rope_parameters=dict(rope_type="default", rope_theta=params["rope_theta"]),
                               **sizes)
        assert max_diff(hf_logits(plain, ids), theirs) > 1e-2


@pytest.mark.parametrize("interleave", [True, False])
def test_deepseek_v3_rope_layout(interleave, tmp_path):
    """DeepSeek-V3 rotates interleaved channel pairs (x0, x1), (x2, x3).. unless config.json says
    rope_interleave=false, then the two halves as Llama does; on the same weights the two differ."""
    hf, loaded = hf_checkpoint("deepseek_v3", tmp_path, rope_interleave=interleave)
    assert loaded.config.rope_interleaved is interleave
    ids = random_ids()
    theirs = hf_logits(hf, ids)
    assert_close(ours(loaded.model, ids), theirs)
    other_layout = random_hf_model("deepseek_v3", rope_interleave=not interleave)
    assert max_diff(hf_logits(other_layout, ids), theirs) > 1e-2


# --- 4. config dialects ---------------------------------------------------------------------------------
@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_transformers_4_config_dialect(type_key, tmp_path):
    """A llama config.json in the 4.x dialect (torch_dtype, top-level rope_theta, rope_scaling keyed
    by ``rope_type`` or the older ``type``) loads like the 5.x file it was rewritten from."""
    hf, loaded = hf_checkpoint("llama", tmp_path)  # llama3 RoPE scaling
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params[type_key] = params.pop("rope_type")
    config["rope_scaling"] = params
    config["torch_dtype"] = config.pop("dtype")
    path.write_text(json.dumps(config))

    legacy = load_model(tmp_path)
    assert legacy.config == loaded.config
    assert legacy.config.rope_scaling.type == "llama3"
    ids = random_ids()
    mine = ours(legacy.model, ids)
    assert torch.equal(mine, ours(loaded.model, ids))
    assert_close(mine, hf_logits(hf, ids))


# --- 5. sliding windows ------------------------------------------------------------------------------------
def _without_window(model: Transformer) -> Transformer:
    """The same weights with full attention in every layer."""
    plain = Transformer(model.config.replace(sliding_window=None, sliding_layers=None)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def test_mistral_sliding_window_matters(tmp_path):
    hf, loaded = hf_checkpoint("mistral", tmp_path)  # sliding_window=4
    assert loaded.config.sliding_window == 4 and loaded.config.is_sliding(1)
    ids = random_ids()  # 12 tokens: most queries see only part of the prefix
    mine = ours(loaded.model, ids)
    assert_close(mine, hf_logits(hf, ids))
    assert max_diff(mine, ours(_without_window(loaded.model), ids)) > 1e-2


@pytest.mark.parametrize("dialect", ["layer_types", "max_window_layers"])
def test_qwen2_sliding_layers(dialect, tmp_path):
    """Qwen2 slides only from layer max_window_layers on; 5.x writes that as ``layer_types``, 4.x
    files only have use_sliding_window + max_window_layers."""
    hf, loaded = hf_checkpoint("qwen2", tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    if dialect == "max_window_layers":
        path = tmp_path / "config.json"
        config = json.loads(path.read_text())
        assert config.pop("layer_types")
        path.write_text(json.dumps(config))
        loaded = load_model(tmp_path)
    assert loaded.config.sliding_window == 4 and loaded.config.sliding_layers == (1,)
    ids = random_ids()
    mine = ours(loaded.model, ids)
    assert_close(mine, hf_logits(hf, ids))
    assert max_diff(mine, ours(_without_window(loaded.model), ids)) > 1e-2


# --- 8. dtype -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "deepseek_v3"])
def test_bfloat16_load(kind, tmp_path):
    hf = random_hf_model(kind)
    hf.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="bfloat16")
    for name, t in loaded.model.state_dict().items():
        expected = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == expected, name
    if kind == "deepseek_v3":  # the router's correction bias arrives in full precision, unrounded
        bias = loaded.model.blocks[1].mlp.gate.e_score_correction_bias
        assert torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    ids = random_ids()
    mine, theirs = ours(loaded.model, ids), hf_logits(hf, ids)
    assert mine.dtype == torch.bfloat16
    assert max_diff(mine, theirs) <= 0.05 * theirs.abs().max().item()
    assert max_diff(mine, theirs) > 0  # really computed in bfloat16


# --- 9. MoE load-balancing loss ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_aux_loss_matches_transformers(kind, tmp_path):
    """One MoE layer, so lucidlm's sum over layers and transformers' pooled loss are the same thing."""
    hf, loaded = hf_checkpoint(kind, tmp_path, num_hidden_layers=1)
    ids = random_ids()
    out = ours_outputs(loaded.model, ids, return_aux_loss=True)
    router_logits = hf_forward(hf, ids, output_router_logits=True).router_logits
    assert len(router_logits) == 1
    m = loaded.config.moe
    expected = load_balancing_loss_func(router_logits, num_experts=m.n_experts, top_k=m.top_k)
    assert out.aux_loss is not None
    assert_close(out.aux_loss, expected, atol=1e-5, what="aux loss")
    assert_close(out.logits, hf_logits(hf, ids))
