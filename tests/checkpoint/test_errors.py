"""A bad checkpoint gets a clear error that names what is wrong, raised before any weight is read.

One real Llama checkpoint is written by transformers per module; each test damages a copy of it
(deletes a file, rewrites config.json, drops / adds / reshapes a tensor, truncates the file) and
checks the ``CheckpointError`` names the file, tensor, shapes or field at fault. A spy on
``SafetensorsReader.get`` (the only way tensor data is read) shows the checks come first.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from hf_models import save_hf_model
from safetensors.torch import load_file, save_file

import lucidlm
from lucidlm.checkpoint import SUPPORTED_MODEL_TYPES, CheckpointError, load_model, read_hf_config, save_model
from lucidlm.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader

K_PROJ = "model.layers.1.self_attn.k_proj.weight"  # (n_kv_heads * head_dim, hidden) = (32, 64)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_hf_model("llama", root / "single")
    save_hf_model("llama", root / "sharded", max_shard_size="60KB")
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A fresh copy of the single-file checkpoint, ours to damage."""
    return shutil.copytree(pristine / "single", tmp_path / "ckpt")


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine / "sharded", tmp_path / "sharded")


@pytest.fixture
def reads(monkeypatch):
    """Names of the tensors whose data the loader read, in order."""
    calls: list[str] = []
    original = SafetensorsReader.get

    def spy(self, name):
        calls.append(name)
        return original(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", spy)
    return calls


def edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def rewrite_tensors(directory, change):
    path = directory / SINGLE_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def load_error(directory, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(directory, **kwargs)
    return str(info.value)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_undamaged_checkpoint_loads_and_the_spy_sees_every_read(ckpt, reads):
    # the control for every "nothing was read" assertion below: a good load is seen reading
    loaded = load_model(ckpt)
    assert sorted(reads) == sorted(load_file(ckpt / SINGLE_FILE))
    assert torch.equal(loaded.model.blocks[1].attn.k_proj.weight, load_file(ckpt / SINGLE_FILE)[K_PROJ])


# --- the directory and config.json ---------------------------------------------------------------------
def test_directory_without_config_json(ckpt):
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert "config.json" in msg and str(ckpt) in msg


def test_path_that_is_not_a_directory(ckpt):
    for path in (ckpt / SINGLE_FILE, ckpt / "no-such-dir"):
        msg = load_error(path)
        assert str(path) in msg and "not a directory" in msg


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "", "\xff\xfe not utf-8"])
def test_config_json_that_is_not_json(ckpt, text):
    (ckpt / "config.json").write_bytes(text.encode("latin-1"))
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "invalid JSON" in msg


def test_config_json_that_is_not_an_object(ckpt):
    (ckpt / "config.json").write_text('["llama"]')
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "JSON object" in msg and "list" in msg


@pytest.mark.parametrize("model_type", ["gpt_neox", None])
def test_unsupported_model_type_lists_the_supported_ones(ckpt, model_type):
    edit_config(ckpt, model_type=model_type)  # None: the field is absent
    msg = load_error(ckpt)
    assert repr(model_type) in msg and "unsupported model_type" in msg
    assert len(SUPPORTED_MODEL_TYPES) >= 11
    for kind in SUPPORTED_MODEL_TYPES:
        assert kind in msg


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_required_field_is_named(ckpt, field):
    edit_config(ckpt, **{field: None})
    msg = load_error(ckpt)
    assert field in msg and "required" in msg


@pytest.mark.parametrize("dialect", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type_is_named(ckpt, dialect):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0, "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8}
    if dialect == "rope_parameters":
        edit_config(ckpt, rope_parameters=rope)
    else:  # transformers 4.x: rope_theta at the top, the old "type" key
        edit_config(ckpt, rope_parameters=None, rope_theta=10000.0,
                    rope_scaling={"type": "longrope", "factor": 4.0})
    msg = load_error(ckpt)
    assert "'longrope'" in msg and "RoPE" in msg
    for kind in ("linear", "dynamic", "yarn", "llama3"):
        assert kind in msg


def test_field_with_a_value_lucidlm_would_compute_differently(ckpt):
    edit_config(ckpt, pretraining_tp=2)
    msg = load_error(ckpt)
    assert "pretraining_tp=2" in msg


@pytest.mark.parametrize("changes, words", [
    (dict(num_attention_heads="four"), ["n_heads", "'four'"]),
    (dict(num_attention_heads=4, num_key_value_heads=3), ["n_heads (4)", "n_kv_heads (3)"]),
    (dict(hidden_act="swiglu_9000"), ["activation", "'swiglu_9000'"]),
    (dict(rope_parameters="yes please"), ["config.json", "llama config", "AttributeError"]),
])
def test_config_values_that_cannot_build_a_model_are_named(ckpt, changes, words):
    edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError) as info:
        read_hf_config(ckpt)
    for word in words:
        assert word in str(info.value)


# --- tensors: all checked against the file headers before any data is read --------------------------------
def _drop(tensors):
    del tensors[K_PROJ]


def _add(tensors):
    tensors["model.layers.0.self_attn.mystery_proj.weight"] = torch.zeros(4, 4)


def _reshape(tensors):
    tensors[K_PROJ] = torch.zeros(16, 64)


@pytest.mark.parametrize("damage, words", [
    (_drop, ["missing tensors", K_PROJ]),
    (_add, ["unexpected tensors", "model.layers.0.self_attn.mystery_proj.weight"]),
    (_reshape, [SINGLE_FILE, repr(K_PROJ), "[16, 64]", "[32, 64]"]),
], ids=["missing", "unexpected", "misshaped"])
def test_bad_tensors_are_named_before_any_data_is_read(ckpt, reads, damage, words):
    rewrite_tensors(ckpt, damage)
    msg = load_error(ckpt)
    for word in words:
        assert word in msg
    assert reads == []


def test_misshaped_tensor_message_says_which_shape_is_which(ckpt, reads):
    rewrite_tensors(ckpt, _reshape)
    msg = load_error(ckpt)
    assert msg.index("[16, 64]") < msg.index("expects") < msg.index("[32, 64]")
    assert reads == []


def test_ignored_tensor_is_not_unexpected(ckpt):
    # old checkpoints carry the RoPE table; it is recomputed, so its presence is no error
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(ckpt)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_file_is_named(ckpt, reads, damage):
    path = ckpt / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07 not a header \x00" * 64,
                      "empty": b""}[damage])
    msg = load_error(ckpt)
    assert str(path) in msg and "corrupt or truncated" in msg
    assert reads == []


def _pickle_bomb(marker):
    """Bytes that, if anything unpickled them, would create ``marker``."""
    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Bomb())


def test_pickle_checkpoint_is_never_unpickled(ckpt, tmp_path, monkeypatch):
    assert pickle.loads(_pickle_bomb(tmp_path / "control")) and (tmp_path / "control").exists()  # the bomb works

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    marker = tmp_path / "unpickled"
    (ckpt / SINGLE_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(_pickle_bomb(marker))
    msg = load_error(ckpt)
    assert "pytorch_model.bin" in msg and "pickle files are never loaded" in msg
    assert not marker.exists()


def test_pickle_checkpoint_of_arbitrary_bytes(ckpt):
    (ckpt / SINGLE_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04 this is not even a pickle")
    assert "pickle files are never loaded" in load_error(ckpt)


def test_directory_without_weights(ckpt):
    (ckpt / SINGLE_FILE).unlink()
    msg = load_error(ckpt)
    assert str(ckpt) in msg and SINGLE_FILE in msg and INDEX_FILE in msg and "pickle" not in msg


# --- sharded checkpoints --------------------------------------------------------------------------------
def test_sharded_checkpoint_loads_like_the_single_file(ckpt, sharded):
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a, b = load_model(ckpt).model.state_dict(), load_model(sharded).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_index_naming_a_missing_shard(sharded, reads):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    msg = load_error(sharded)
    assert str(shard) in msg and INDEX_FILE in msg and "do not exist" in msg
    assert reads == []


@pytest.mark.parametrize("text, words", [
    ('{"weight_map": {', ["not a valid safetensors index", "invalid JSON", "Expecting"]),
    ('{"metadata": {}}', ["not a valid safetensors index", "weight_map"]),
    ('{"weight_map": ["model-00001-of-00006.safetensors"]}', ["weight_map", "shard file names"]),
    ('{"weight_map": {"lm_head.weight": 7}}', ["weight_map", "shard file names"]),
])
def test_bad_index(sharded, reads, text, words):
    (sharded / INDEX_FILE).write_text(text)
    msg = load_error(sharded)
    assert str(sharded / INDEX_FILE) in msg
    for word in words:
        assert word in msg
    assert reads == []


def test_tensor_stored_in_two_shards(sharded, reads):
    first, second = sorted(sharded.glob("model-*.safetensors"))[:2]
    tensors = load_file(second)
    name = next(iter(load_file(first)))
    tensors[name] = torch.zeros(1)
    save_file(tensors, second, metadata={"format": "pt"})
    msg = load_error(sharded)
    assert repr(name) in msg and first.name in msg and second.name in msg and "twice" in msg
    assert reads == []


def test_corrupt_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    msg = load_error(sharded)
    assert str(shard) in msg and "corrupt or truncated" in msg


# --- dtype ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_unsupported_dtype_names_the_choices(ckpt, reads, dtype):
    with pytest.raises(ValueError) as info:
        load_model(ckpt, dtype=dtype)
    msg = str(info.value)
    assert repr(dtype) in msg
    for choice in ("float32", "bfloat16", "float16", "auto"):
        assert choice in msg
    assert reads == []


def test_supported_dtypes_load(ckpt):
    for dtype, expected in [("bf16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)]:
        assert load_model(ckpt, dtype=dtype).model.embed.weight.dtype == expected


# --- lucidlm's own layout --------------------------------------------------------------------------------
@pytest.fixture
def native(tmp_path):
    model = lucidlm.Transformer(lucidlm.from_preset("llama-125m", tiny=True))
    return model, save_model(model, tmp_path / "native")


def test_native_layout_round_trip(native):
    model, directory = native
    hf = json.loads((directory / "config.json").read_text())
    assert hf["model_type"] == "lucidlm"
    assert lucidlm.ModelConfig.from_dict(hf["lucidlm_config"]) == model.config
    loaded = load_model(directory)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_native_layout_without_lucidlm_config(native):
    _, directory = native
    edit_config(directory, lucidlm_config=None)
    msg = load_error(directory)
    assert "'lucidlm_config'" in msg and "lucidlm" in msg


@pytest.mark.parametrize("change, words", [
    (dict(warp_drive=True), ["unknown ModelConfig fields", "warp_drive"]),
    (dict(n_kv_heads=3), ["n_heads (4)", "n_kv_heads (3)"]),
    (dict(moe={"n_experts": 2, "top_k": 3}), ["top_k", "n_experts=2"]),
    (dict(rope_scaling={"kind": "yarn"}), ["rope_scaling", "'kind'"]),
])
def test_native_layout_with_an_invalid_lucidlm_config(native, reads, change, words):
    _, directory = native
    hf = json.loads((directory / "config.json").read_text())
    edit_config(directory, lucidlm_config={**hf["lucidlm_config"], **change})
    msg = load_error(directory)
    assert "invalid lucidlm_config" in msg
    for word in words:
        assert word in msg
    assert reads == []


def test_native_layout_with_a_misshaped_tensor(native, reads):
    model, directory = native
    name = "blocks.0.attn.k_proj.weight"
    expected = list(model.state_dict()[name].shape)
    rewrite_tensors(directory, lambda t: t.update({name: torch.zeros(expected[0], expected[1] + 1)}))
    msg = load_error(directory)
    assert repr(name) in msg and str(expected) in msg and str([expected[0], expected[1] + 1]) in msg
    assert reads == []
