"""Hostile checkpoints: names and links out of the directory, FIFOs, JSON bombs, absurd sizes, integer weights,
token ids past the embedding. Each is refused with a CheckpointError naming the file (and field or tensor),
before a tensor is read; nothing outside the directory is ever opened.

Inputs that hung before (a FIFO blocks its reader forever; a 10^9-layer config builds for hours) run in a
forked child with a generous guard, so that a missing check fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys

import pytest
import torch
from hf_models import save_hf_model
from safetensors.torch import load_file, save_file
from tiny_lm import tiny_model
from typer.testing import CliRunner

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.checkpoint import FAMILIES, CheckpointError, load_model, read_hf_config, save_model
from lucidlm.checkpoint.peft_adapter import load_adapter, save_adapter
from lucidlm.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader
from lucidlm.model.lora import LoRAConfig, apply_lora
from lucidlm.tokenizer import Tokenizer, byte_tokenizer

GUARD_S = 300  # only reached when a check is missing
OUTSIDE = "outside the checkpoint directory"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="forks a guarded child")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_hf_model("llama", root / "single")
    save_hf_model("llama", root / "sharded", max_shard_size="60KB")
    lm = tiny_model(vocab_size=byte_tokenizer().vocab_size)  # a model the byte tokenizer fits
    save_model(lm, root / "chat", FAMILIES["llama"])
    byte_tokenizer().save(root / "chat")
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    return shutil.copytree(pristine / "single", tmp_path / "ckpt")


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine / "sharded", tmp_path / "sharded")


@pytest.fixture
def chat(pristine, tmp_path):
    return shutil.copytree(pristine / "chat", tmp_path / "chat")


@pytest.fixture
def reads(monkeypatch):
    calls: list[str] = []
    original = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: calls.append(name) or original(self, name))
    return calls


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _child(fn, args, conn) -> None:
    torch.set_num_threads(1)  # no OpenMP region in a forked child (the parent's thread pool is not inherited)
    try:
        fn(*args)
        conn.send(("returned", ""))
    except BaseException as e:  # noqa: B036 - whatever happened, the parent reports it
        conn.send((type(e).__name__, str(e)[:1000]))


def in_child(fn, *args) -> tuple[str, str]:
    """(exception type name, message) of ``fn(*args)`` run in a forked child, killed after GUARD_S."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, args, send))
    child.start()
    send.close()
    try:
        if not receive.poll(GUARD_S):
            pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {GUARD_S} s")
        return receive.recv()
    finally:
        child.kill()
        child.join()


# --- security: nothing outside the checkpoint directory is read ------------------------------------------

@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_naming_a_shard_outside_the_directory(sharded, tmp_path, reads, where):
    index = json.loads((sharded / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    outside = tmp_path / "outside.safetensors"
    shutil.move(sharded / shard, outside)
    name = "../outside.safetensors" if where == "relative" else str(outside)
    index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    msg = error_of(load_model, sharded)
    assert OUTSIDE in msg and str(sharded / name) in msg and reads == []


def test_weights_linked_outside_the_directory(ckpt, tmp_path, reads):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / SINGLE_FILE, outside)
    (ckpt / SINGLE_FILE).symlink_to(outside)
    msg = error_of(load_model, ckpt)
    assert OUTSIDE in msg and str(ckpt / SINGLE_FILE) in msg and reads == []


def test_shard_directory_linked_outside(sharded, tmp_path):
    index = json.loads((sharded / INDEX_FILE).read_text())
    (tmp_path / "far").mkdir()
    for shard in set(index["weight_map"].values()):
        shutil.move(sharded / shard, tmp_path / "far" / shard)
    (sharded / "shards").symlink_to(tmp_path / "far")
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    assert OUTSIDE in error_of(load_model, sharded)


def test_config_linked_outside_the_directory(ckpt, tmp_path):
    shutil.move(ckpt / "config.json", tmp_path / "config.json")
    (ckpt / "config.json").symlink_to(tmp_path / "config.json")
    msg = error_of(read_hf_config, ckpt)  # what `lucidlm info` reads
    assert OUTSIDE in msg and str(ckpt / "config.json") in msg
    result = CliRunner().invoke(app, ["info", str(ckpt), "--json"])
    assert isinstance(result.exception, CheckpointError) and OUTSIDE in str(result.exception)


def test_links_inside_the_directory_are_followed(ckpt):
    (ckpt / "weights").mkdir()
    shutil.move(ckpt / SINGLE_FILE, ckpt / "weights" / "w.safetensors")
    (ckpt / SINGLE_FILE).symlink_to("weights/w.safetensors")
    assert load_model(ckpt).config.n_layers == 2


def test_a_hub_cache_snapshot_loads_and_its_links_stay_in_the_repository(ckpt, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("config.json", SINGLE_FILE)):  # the hub's layout: relative links into blobs/
        shutil.copy(ckpt / name, repo / "blobs" / f"blob{i}")
        (snapshot / name).symlink_to(f"../../blobs/blob{i}")
    assert load_model(snapshot).config.n_layers == 2
    (snapshot / SINGLE_FILE).unlink()
    (snapshot / SINGLE_FILE).symlink_to(ckpt / SINGLE_FILE)  # out of the repository
    assert OUTSIDE in error_of(load_model, snapshot)


def test_tokenizer_files_linked_outside_are_neither_read_nor_copied(chat, tmp_path):
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ 'the secret' }}")
    (chat / "chat_template.jinja").symlink_to(secret)
    assert OUTSIDE in error_of(lucidlm.load, chat, device="cpu")
    out = tmp_path / "copy"
    assert OUTSIDE in error_of(save_model, load_model(chat).model, out, FAMILIES["llama"], source=chat)
    assert not (out / "chat_template.jinja").exists()


# --- a FIFO (or any non-regular file) is never opened ------------------------------------------------------

def _load(path):
    lucidlm.load(path, device="cpu")


@linux_only
@pytest.mark.parametrize("name", [SINGLE_FILE, "config.json", "generation_config.json", "tokenizer.json",
                                  "tokenizer_config.json", "chat_template.jinja"])
def test_a_fifo_in_the_checkpoint_is_refused(chat, name):
    (chat / name).unlink(missing_ok=True)
    os.mkfifo(chat / name)  # a reader blocks in open() until someone writes
    kind, msg = in_child(_load, chat)
    assert kind == "CheckpointError" and "is a FIFO, not a regular file" in msg and str(chat / name) in msg


@linux_only
def test_a_fifo_shard_is_refused(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    kind, msg = in_child(load_model, sharded)
    assert kind == "CheckpointError" and "FIFO" in msg and str(shard) in msg


def test_a_directory_as_weights_is_refused(ckpt):
    (ckpt / SINGLE_FILE).unlink()
    (ckpt / SINGLE_FILE).mkdir()
    assert "is a directory, not a regular file" in error_of(load_model, ckpt)


# --- JSON: deep nesting, wrong shapes, absurd sizes ------------------------------------------------------------

DEEP = ["[" * 100_000 + "]" * 100_000, '{"a": ' * 1000 + "1" + "}" * 1000,
        '{"model_type": "llama", "rope_scaling": ' + "[" * 995 + "]" * 995 + "}"]


@pytest.mark.parametrize("text", DEEP, ids=["100k arrays", "1000 objects", "995 arrays in a field"])
def test_deeply_nested_config_is_a_clear_error(ckpt, text):
    (ckpt / "config.json").write_text(text)
    for fn in (read_hf_config, load_model, lucidlm.load):
        msg = error_of(fn, ckpt)
        assert "nested too deeply" in msg and str(ckpt / "config.json") in msg
    result = CliRunner().invoke(app, ["info", str(ckpt)])
    assert isinstance(result.exception, CheckpointError) and "nested too deeply" in str(result.exception)


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
def test_deeply_nested_side_files_are_a_clear_error(chat, name):
    (chat / name).write_text(DEEP[1])
    msg = error_of(lucidlm.load, chat, device="cpu")
    assert "nested too deeply" in msg and str(chat / name) in msg


def test_deeply_nested_index_is_a_clear_error(sharded):
    (sharded / INDEX_FILE).write_text(DEEP[0])
    assert "nested too deeply" in error_of(load_model, sharded)


@pytest.mark.parametrize("field, value, ours", [
    ("num_hidden_layers", 10**9, "n_layers"), ("hidden_size", 2**40, "dim"), ("vocab_size", 10**12, "vocab_size"),
    ("num_attention_heads", 2**20, "n_heads"), ("intermediate_size", 10**12, "ffn_dim"),
    ("max_position_embeddings", 10**15, "max_seq_len"),
])
def test_absurd_sizes_are_refused_before_building(ckpt, field, value, ours):
    edit_json(ckpt / "config.json", **{field: value})
    msg = error_of(read_hf_config, ckpt)
    assert str(ckpt / "config.json") in msg and f"ModelConfig.{ours} = {value}" in msg and "beyond any real" in msg


def _info(path):
    app(["info", str(path), "--json"], standalone_mode=False)


@linux_only
def test_info_on_a_billion_layers_answers_at_once(ckpt):
    edit_json(ckpt / "config.json", num_hidden_layers=10**9)
    kind, msg = in_child(_info, ckpt)  # before: building 10^9 meta layers ran for hours
    assert kind == "CheckpointError" and "n_layers" in msg


def test_too_many_experts_are_refused(ckpt):
    edit_json(ckpt / "config.json", model_type="mixtral", num_hidden_layers=1000, num_local_experts=4000,
              num_experts_per_tok=2)
    assert "experts is beyond any real model" in error_of(read_hf_config, ckpt)


# --- token ids ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    ({"eos_token_id": list(range(100_000))}, "lists 100000 ids (at most 1024)"),
    ({"eos_token_id": [2, 128]}, "eos_token_id"),
    ({"bos_token_id": 500}, "bos_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"eos_token_id": "2"}, "eos_token_id"),
])
def test_bad_token_ids_in_config_json(ckpt, changes, words):
    edit_json(ckpt / "config.json", **changes)
    msg = error_of(read_hf_config, ckpt)
    assert words in msg and str(ckpt / "config.json") in msg


@pytest.mark.parametrize("changes, words", [
    ({"eos_token_id": list(range(100_000))}, "lists 100000 ids (at most 1024)"),
    ({"eos_token_id": [1, 259]}, "eos_token_id 259 is not a token id of this model"),
    ({"pad_token_id": True}, "pad_token_id True"),
])
def test_bad_token_ids_in_generation_config(chat, changes, words):
    (chat / "generation_config.json").write_text(json.dumps(changes))
    msg = error_of(lucidlm.load, chat, device="cpu")
    assert words in msg and str(chat / "generation_config.json") in msg


def test_many_eos_ids_are_deduplicated_in_order(chat):
    ids = [5, 3, *range(259), 5]
    (chat / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    lm = lucidlm.load(chat, device="cpu")
    assert lm.eos_token_ids == [257, 5, 3, *(i for i in range(259) if i not in (3, 5, 257))]  # tokenizer's first


def test_a_tokenizer_bigger_than_the_embedding_is_refused(ckpt):
    byte_tokenizer().save(ckpt)  # 259 ids; the model has 128 rows
    msg = error_of(lucidlm.load, ckpt, device="cpu")
    assert "token ids up to 258" in msg and "128 rows" in msg and str(ckpt / "tokenizer.json") in msg


def test_a_fitting_tokenizer_loads(chat):
    lm = lucidlm.load(chat, device="cpu")
    assert lm.tokenizer.max_token_id() < lm.config.vocab_size and lm.decode(lm.encode("hi"), True) == "hi"


# --- tensor dtypes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.uint8, "U8")])
def test_integer_weights_are_refused_by_name(ckpt, reads, dtype, name):
    tensors = load_file(ckpt / SINGLE_FILE)
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    save_file(tensors, ckpt / SINGLE_FILE, metadata={"format": "pt"})
    msg = error_of(load_model, ckpt)
    assert repr(key) in msg and f"dtype {name}" in msg and str(ckpt / SINGLE_FILE) in msg and reads == []


def test_an_ignored_integer_buffer_still_loads(ckpt):
    tensors = load_file(ckpt / SINGLE_FILE)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.int64)
    save_file(tensors, ckpt / SINGLE_FILE, metadata={"format": "pt"})
    assert load_model(ckpt).config.n_layers == 2


# --- PEFT adapters and GGUF directories go through the same checks ---------------------------------------------

@pytest.fixture
def adapter(chat, tmp_path):
    model = apply_lora(load_model(chat).model, LoRAConfig(r=2, target_modules=("q_proj",)))
    return save_adapter(model, FAMILIES["llama"], tmp_path / "adapter")


def test_adapter_files_linked_outside_are_refused(chat, adapter, tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.move(adapter / name, tmp_path / name)
        (adapter / name).symlink_to(tmp_path / name)
        msg = error_of(load_adapter, load_model(chat).model, FAMILIES["llama"], adapter)
        assert OUTSIDE in msg and str(adapter / name) in msg
        (adapter / name).unlink()
        shutil.move(tmp_path / name, adapter / name)


@pytest.mark.parametrize("text, words", [("[]", "expected a JSON object"), (DEEP[1], "nested too deeply")],
                         ids=["array", "nested"])
def test_bad_adapter_config(chat, adapter, text, words):
    (adapter / "adapter_config.json").write_text(text)
    assert words in error_of(load_adapter, load_model(chat).model, FAMILIES["llama"], adapter)


def test_integer_adapter_tensor_is_refused(chat, adapter):
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, adapter / "adapter_model.safetensors")
    msg = error_of(load_adapter, load_model(chat).model, FAMILIES["llama"], adapter)
    assert repr(key) in msg and "dtype I32" in msg


@linux_only
def test_fifo_adapter_weights_are_refused(chat, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(adapter / "adapter_model.safetensors")
    kind, msg = in_child(load_adapter, load_model(chat).model, FAMILIES["llama"], adapter)
    assert kind == "CheckpointError" and "FIFO" in msg


def test_gguf_in_a_directory_linked_outside_is_refused(tmp_path):
    from gguf_models import write_gguf

    m = write_gguf(tmp_path / "real.gguf", "llama", "F32", with_dequantized=False)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "model.gguf").symlink_to(m.path)
    assert OUTSIDE in error_of(lucidlm.load, tmp_path / "dir", device="cpu")
    (tmp_path / "named.gguf").symlink_to(m.path)  # a file the user names is theirs to link
    assert lucidlm.load(tmp_path / "named.gguf", device="cpu").config.n_layers == 2


@linux_only
def test_fifo_gguf_in_a_directory_is_refused(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    kind, msg = in_child(_load, tmp_path)
    assert kind == "CheckpointError" and "FIFO" in msg


def test_tokenizer_reads_only_through_the_checked_paths(chat, monkeypatch):
    # the one reader: no Path.read_text / open of checkpoint files elsewhere in the tokenizer
    monkeypatch.setattr("pathlib.Path.read_text", lambda *a, **k: pytest.fail("read_text bypasses the checks"))
    assert Tokenizer.from_dir(chat) is not None
