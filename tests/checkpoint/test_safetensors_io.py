"""safetensors_io: sharded and single-file writes read back bit for bit, a save in one layout
removes the other layout's leftovers, and every write is atomic (all or nothing, no temp files)."""

from __future__ import annotations

import json

import pytest
import torch

from lucidlm.checkpoint.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    write_safetensors,
)


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),  # 4096 bytes
        "blocks.0.attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),  # 512 bytes
        "blocks.0.attn.q_proj.bias": torch.randn(16, generator=g).to(torch.float16),
        "blocks.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),  # 2048 bytes
        "blocks.1.mlp.up_proj.weight": torch.randn(32, 16, generator=g)[:, ::2],  # not contiguous
        "counts": torch.arange(10, dtype=torch.int64) + seed,
        "norm.weight": torch.randn(16, generator=g),
    }


def assert_reads_back(directory, tensors):
    reader = SafetensorsReader(directory)
    assert sorted(reader.tensors) == sorted(tensors)
    for name, t in tensors.items():
        info = reader.tensors[name]
        assert info.shape == tuple(t.shape)
        got = reader.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_small_checkpoint_is_one_file(tmp_path):
    tensors = make_tensors()
    files = write_safetensors(tmp_path, tensors)
    assert files == [tmp_path / SINGLE_FILE]
    assert listing(tmp_path) == [SINGLE_FILE]
    assert_reads_back(tmp_path, tensors)


def test_sharded_write_reads_back_identically(tmp_path):
    tensors = make_tensors()
    files = write_safetensors(tmp_path, tensors, max_shard_bytes=4096)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert listing(tmp_path) == sorted([INDEX_FILE] + [f.name for f in files])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    reader = SafetensorsReader(tmp_path)
    for name, file in index["weight_map"].items():
        assert reader.tensors[name].file == tmp_path / file  # each tensor is read from the shard the index names
    assert_reads_back(tmp_path, tensors)


def test_no_shard_exceeds_the_limit_unless_one_tensor_does(tmp_path):
    tensors = make_tensors()
    limit = 2600
    files = write_safetensors(tmp_path, tensors, max_shard_bytes=limit)
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    for f in files:
        held = [tensors[n] for n, file in index.items() if file == f.name]
        size = sum(t.numel() * t.element_size() for t in held)
        assert size <= limit or len(held) == 1
    assert_reads_back(tmp_path, tensors)


def test_sharded_then_single_removes_the_stale_index_and_shards(tmp_path):
    write_safetensors(tmp_path, make_tensors(0), max_shard_bytes=4096)
    assert (tmp_path / INDEX_FILE).exists()
    new = make_tensors(1)
    write_safetensors(tmp_path, new)
    assert listing(tmp_path) == [SINGLE_FILE]
    assert_reads_back(tmp_path, new)


def test_single_then_sharded_removes_the_stale_single_file(tmp_path):
    write_safetensors(tmp_path, make_tensors(0))
    new = make_tensors(1)
    files = write_safetensors(tmp_path, new, max_shard_bytes=4096)
    assert listing(tmp_path) == sorted([INDEX_FILE] + [f.name for f in files])
    assert_reads_back(tmp_path, new)


def test_fewer_shards_remove_the_old_extra_shards(tmp_path):
    assert len(write_safetensors(tmp_path, make_tensors(0), max_shard_bytes=2048)) > 3
    (tmp_path / "notes.txt").write_text("mine")  # other files in the directory are left alone
    new = make_tensors(1)
    files = write_safetensors(tmp_path, new, max_shard_bytes=4096)
    assert listing(tmp_path) == sorted([INDEX_FILE, "notes.txt"] + [f.name for f in files])
    assert_reads_back(tmp_path, new)


def test_reader_takes_shapes_and_dtypes_from_the_headers(tmp_path):
    write_safetensors(tmp_path, make_tensors(), max_shard_bytes=4096)
    reader = SafetensorsReader(tmp_path)
    assert reader.tensors["blocks.1.mlp.up_proj.weight"].shape == (32, 8)
    assert reader.tensors["blocks.0.attn.q_proj.weight"].dtype == "BF16"
    with pytest.raises(KeyError):
        reader.get("no.such.tensor")


def test_failed_safetensors_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = make_tensors(0)
    write_safetensors(tmp_path, old)
    import lucidlm.checkpoint.safetensors_io as io

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial write, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(io, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        write_safetensors(tmp_path, make_tensors(1))
    assert listing(tmp_path) == [SINGLE_FILE]
    assert_reads_back(tmp_path, old)
