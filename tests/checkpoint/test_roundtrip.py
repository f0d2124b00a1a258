"""Sharded checkpoints, and checkpoints lucidlm writes: read back by transformers and by lucidlm
with the same logits as the model they came from."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import FAMILIES
from hf_parity import assert_close, hf_checkpoint, hf_logits, ours, random_ids
from transformers import AutoModelForCausalLM

import lucidlm
from lucidlm.checkpoint import load_model, save_model
from lucidlm.model.transformer import Transformer


def _transformers_load(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# --- 6. sharded checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "deepseek_v3"])
def test_sharded_checkpoint(kind, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    hf, loaded = hf_checkpoint(kind, whole)
    hf.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    ids = random_ids()
    mine = ours(load_model(sharded).model, ids)
    assert torch.equal(mine, ours(loaded.model, ids))
    expected = hf_logits(hf, ids)
    assert_close(mine, expected)

    # lucidlm writes shards too, which transformers reads
    out = save_model(loaded.model, tmp_path / "out", family=loaded.family, hf_config=loaded.hf_config,
                     max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    assert_close(hf_logits(_transformers_load(out), ids), expected)


# --- 7. round trips ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_save_model_round_trip(kind, tmp_path):
    """transformers -> lucidlm -> save_model (family layout, original config.json) -> transformers."""
    hf, loaded = hf_checkpoint(kind, tmp_path / "hf")
    out = save_model(loaded.model, tmp_path / "out", family=loaded.family, hf_config=loaded.hf_config)
    ids = random_ids()
    expected = hf_logits(hf, ids)
    assert_close(hf_logits(_transformers_load(out), ids), expected)
    assert torch.equal(ours(load_model(out).model, ids), ours(loaded.model, ids))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_config_written_by_family(kind, tmp_path):
    """The same round trip with config.json written from the lucidlm config (``family.to_hf_config``):
    transformers must rebuild the identical architecture from it."""
    hf, loaded = hf_checkpoint(kind, tmp_path / "hf")
    out = save_model(loaded.model, tmp_path / "out", family=loaded.family)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and "lucidlm_config" not in config
    ids = random_ids()
    assert_close(hf_logits(_transformers_load(out), ids), hf_logits(hf, ids))
    again = load_model(out)
    assert again.config == loaded.config
    assert torch.equal(ours(again.model, ids), ours(loaded.model, ids))


@pytest.mark.parametrize("overrides", [{}, dict(attn_gate=True, norm_placement="sandwich", logit_softcap=30.0)],
                         ids=["llama", "no-hf-equivalent"])
def test_native_layout_round_trip(overrides, tmp_path):
    """save_model without a family writes lucidlm's own layout, which reloads bit for bit (also for
    configs no Hugging Face family can describe)."""
    cfg = lucidlm.from_preset("llama-125m", tiny=True, **overrides)
    model = Transformer(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lucidlm"
    loaded = load_model(tmp_path)
    assert loaded.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    assert torch.equal(ours(loaded.model, ids), ours(model, ids))


@pytest.mark.parametrize("kind", ["ntk", "ntk_by_parts"])
def test_rope_scaling_without_hf_name_refused_before_writing(kind, tmp_path):
    """transformers has no rope_type for static NTK or NTK-by-parts: saving in the llama layout is refused before a
    file is written, and lucidlm's own layout keeps the scaling."""
    from lucidlm.checkpoint.errors import CheckpointError
    from lucidlm.checkpoint.loader import FAMILIES as OUR_FAMILIES
    from lucidlm.config import RopeScaling

    scaling = RopeScaling(type=kind, factor=4.0, original_max_seq_len=64)
    model = Transformer(lucidlm.from_preset("llama-125m", tiny=True, rope_scaling=scaling))
    with pytest.raises(CheckpointError, match=f"'{kind}' has no transformers rope_type"):
        save_model(model, tmp_path / "hf", family=OUR_FAMILIES["llama"])
    assert not (tmp_path / "hf").exists()
    save_model(model, tmp_path / "native")
    assert load_model(tmp_path / "native").config.rope_scaling == scaling
