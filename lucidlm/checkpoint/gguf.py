"""GGUF (llama.cpp's one-file format) -> the Hugging Face config and tensors a family loads.

A GGUF file holds metadata (architecture hyper-parameters, the tokenizer) and tensors under
llama.cpp's names, many of them quantized. ``gguf_hf_config`` turns the metadata into the
config.json dict of a Hugging Face model type (``llama``, ``qwen2``, ``qwen3``, ``gemma3_text``), so the existing
families build the ``ModelConfig``; ``GGUFTensors`` lists the tensors under the Hugging Face names
those families expect (shapes known from the header, no data read) and dequantizes one tensor at
a time on request, from the memory-mapped file. llama.cpp's converter permutes the rows of Llama's
Q and K projections for its RoPE kernel (pairs (2i, 2i+1) instead of halves), and stores Gemma's
(1 + w) norm weights with the 1 added; both are undone here.

The header is parsed here rather than with ``gguf.GGUFReader``, which builds a numpy view per
array element (about 5 s for a 49k-token vocabulary); the ``gguf`` package supplies the type
tables and the dequantization kernels.

A new architecture is one entry in ``ARCHITECTURES`` (its model type, tensor names, whether Q/K
are permuted, a norm offset, what its config needs beyond the common keys).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .errors import CheckpointError
from .files import checkpoint_file, regular_file
from .safetensors_io import TensorInfo

MAGIC = b"GGUF"
ALIGNMENT = 32  # general.alignment's default
# GGUF metadata value types -> struct format (8 = string, 9 = array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


# --- the file ----------------------------------------------------------------------------------

@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the innermost (contiguous) one
    qtype: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch (row-major) shape."""
        return tuple(reversed(self.dims))


class _Cursor:
    """Reads little-endian values from a buffer; running past its end means the file is truncated."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated GGUF file (the header runs past the end of the file)")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, kind: int) -> Any:
        fmt = SCALARS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: corrupt GGUF file (a string is not UTF-8: {e})") from e

    def strings(self, n: int) -> list[str]:
        """n strings at once: a vocabulary is ~100k of them, so this loop is kept tight."""
        buf, pos, out = self.buf, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                (size,) = unpack(buf, pos)
                out.append(buf[pos + 8:pos + 8 + size].decode("utf-8"))
                pos += 8 + size
        except struct.error:
            pos = len(buf) + 1
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: corrupt GGUF file (a string is not UTF-8: {e})") from e
        if pos > len(buf):
            raise CheckpointError(f"{self.path}: truncated GGUF file (the header runs past the end of the file)")
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.scalar(4), self.scalar(10)
            if item == STRING:
                return self.strings(n)
            if item not in NUMPY:
                raise CheckpointError(f"{self.path}: corrupt GGUF file (array of unknown type {item})")
            dtype = np.dtype(NUMPY[item])
            return np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype).tolist()
        if kind not in SCALARS:
            raise CheckpointError(f"{self.path}: corrupt GGUF file (metadata value of unknown type {kind})")
        return self.scalar(kind)


class GGUFFile:
    """A GGUF file's metadata and tensor directory, parsed once; tensor data stays in the mapped file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise CheckpointError(f"{self.path}: cannot read GGUF file ({e})") from e
        cur = _Cursor(self._map, self.path)
        if bytes(cur.take(4)) != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with b'GGUF')")
        version = cur.scalar(4)
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are; "
                                  "a big-endian file reads as a huge version)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar(4))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", ALIGNMENT))
        start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, qtype, rel in infos:
            info = GGUFTensorInfo(name, dims, qtype, start + rel, _nbytes(self.path, name, dims, qtype))
            if info.offset + info.nbytes > len(self._map):
                raise CheckpointError(f"{self.path}: truncated GGUF file (tensor {name!r} ends at byte "
                                      f"{info.offset + info.nbytes}, the file has {len(self._map)})")
            self.tensors[name] = info

    def _tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string()
        dims = tuple(cur.scalar(10) for _ in range(cur.scalar(4)))
        return name, dims, cur.scalar(4), cur.scalar(10)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: no general.architecture in the GGUF metadata")
        return arch

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to float32, in its row-major shape."""
        info = self.tensors[name]
        check_tensor_type(self.path, info)
        rows = math.prod(info.dims[1:])
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(rows, -1)
        if info.qtype in FAST_TYPES:
            return dequantize_fast(raw, info.qtype).reshape(info.shape)
        from gguf.quants import dequantize

        try:
            out = dequantize(raw, info.qtype)
        except Exception as e:  # the kernels raise plain numpy errors on malformed blocks
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {name!r} ({e})") from e
        return torch.from_numpy(np.require(out, np.float32, ["C", "W"])).reshape(info.shape)  # copies a mapped view

    def read_blocks(self, name: str) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """A 2-D Q4_0 / Q4_1 / Q8_0 tensor as stored: (scheme name, q, d, m) of ``split_blocks``, as tensors;
        None for any other type (read it with ``read``)."""
        info = self.tensors[name]
        if info.qtype not in QUANTIZED_SCHEMES or len(info.dims) != 2:
            return None
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(info.dims[1], -1)
        q, d, m = split_blocks(raw, info.qtype)
        return (QUANTIZED_SCHEMES[info.qtype], torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d),
                None if m is None else torch.from_numpy(m))


# --- dequantization ----------------------------------------------------------------------------
# The common types with whole-tensor numpy expressions: gguf.quants' kernels work in row groups and take
# ~4 s for a 135M model, these ~1 s. numpy, not torch: single-threaded, it stays fast on a busy machine,
# where torch's two spinning threads are several times slower. Same float32 arithmetic as gguf.quants
# (tests check equality).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
FAST_TYPES = (F32, F16, Q4_0, Q4_1, Q8_0, BF16)
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
# kept quantized by load(quantize="gguf") (model/quantized_linear.py)
QUANTIZED_SCHEMES = {Q4_0: "q4_0", Q4_1: "q4_1", Q8_0: "q8_0"}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """A block's 16 bytes -> its 32 4-bit values (uint8): low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def dequantize_fast(raw: np.ndarray, qtype: int) -> torch.Tensor:
    """(rows, row bytes) uint8 of one of FAST_TYPES -> (rows, row values) float32."""
    rows = raw.shape[0]
    if qtype == F32:
        out = raw.view(np.float32).copy()  # a copy: the mapping is read-only
    elif qtype == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == BF16:  # bfloat16 is the high half of a float32
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        q, d, m = split_blocks(raw, qtype)
        q = q.reshape(*d.shape, -1).astype(np.float32)  # (rows, blocks, 32)
        if qtype == Q8_0:
            out = d[..., None] * q
        elif qtype == Q4_0:
            out = d[..., None] * (q - 8)
        else:
            out = d[..., None] * q + m[..., None]
    return torch.from_numpy(out.reshape(rows, -1))


def split_blocks(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows, row bytes) uint8 of Q8_0 / Q4_0 / Q4_1 -> the integers q (rows, row values: int8, or 0..15 as uint8),
    the scales d and, for Q4_1, the minimums m (rows, blocks of 32) in float32: Q8_0 is d·q, Q4_0 d·(q − 8),
    Q4_1 d·q + m."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, BLOCK_BYTES[qtype])
    d = _f16(blocks, 0).reshape(rows, -1)
    if qtype == Q8_0:
        return blocks[:, 2:].view(np.int8).reshape(rows, -1), d, None
    if qtype == Q4_0:
        return _nibbles(blocks[:, 2:]).reshape(rows, -1), d, None
    return _nibbles(blocks[:, 4:]).reshape(rows, -1), d, _f16(blocks, 2).reshape(rows, -1)


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"unknown type {qtype}"


def _nbytes(path: Path, name: str, dims: tuple[int, ...], qtype: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: tensor {name!r} has tensor type {qtype}, which this gguf package does "
                              f"not know; supported types: {', '.join(supported_tensor_types())}") from None
    if not dims or dims[0] % block:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {list(dims)}, not whole {_type_name(qtype)} "
                              f"blocks of {block}")
    return math.prod(dims) // block * size


@functools.cache
def _dequantizable(qtype: int) -> bool:
    """Whether gguf.quants has a kernel for this type: dequantize one zero block and see."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType(qtype)
    try:
        block, size = GGML_QUANT_SIZES[kind]
        out = dequantize(np.zeros((1, size), dtype=np.uint8), kind)
        return out.dtype == np.float32 and out.size == block
    except Exception:
        return False


def supported_tensor_types() -> list[str]:
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if _dequantizable(t.value)]


def check_tensor_type(path: Path, info: GGUFTensorInfo) -> None:
    if not _dequantizable(info.qtype):
        raise CheckpointError(f"{path}: tensor {info.name!r} has tensor type {_type_name(info.qtype)}, which "
                              f"cannot be dequantized; supported types: {', '.join(supported_tensor_types())}")


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed file, cached per (path, mtime, size): loading reads it for the model and the tokenizer.
    ``path`` is the file itself: named by the user, or found by ``find_gguf`` (which keeps it inside its directory)."""
    real = regular_file(path)  # a FIFO would block the mmap's open forever
    st = real.stat()
    return _open_cached(real, st.st_mtime_ns, st.st_size)


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: a ``.gguf`` file, or a directory with exactly one and no config.json
    (which must be a regular file inside the directory: a link out of it is refused)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or os.path.lexists(path / "config.json"):
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise CheckpointError(f"{path}: holds several GGUF files ({[f.name for f in files]}); pass one of them")
    if files:
        checkpoint_file(path, files[0].name)
    return files[0] if files else None


# --- architectures -----------------------------------------------------------------------------

# llama.cpp's tensor names -> Hugging Face's (the names llama_family.LLAMA_RENAMES produces)
LLAMA_TENSORS = [
    (r"token_embd\.weight", r"model.embed_tokens.weight"),
    (r"output_norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2"),
]


# Gemma 3's sandwich norms: llama.cpp's ffn_norm is the pre-feedforward one
GEMMA3_TENSORS = [
    (r"blk\.(\d+)\.post_attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
] + LLAMA_TENSORS


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the Hugging Face model_type whose family loads it
    hf_architecture: str
    tensors: list[tuple[str, str]]  # (GGUF name regex, HF name template)
    permute_qk: bool = False  # llama.cpp's converter interleaves Llama's Q/K rows (see unpermute)
    norm_offset: float = 0.0  # subtracted from *norm.weight: llama.cpp stores Gemma's (1 + w) as is
    adapt_config: Callable[[GGUFFile, dict], None] | None = None  # what the family needs beyond the common keys


def _qwen2_config(f: GGUFFile, hf: dict) -> None:
    hf["use_sliding_window"] = False


def _gemma3_config(f: GGUFFile, hf: dict) -> None:
    """config.json's 4.x dialect: rope_theta and rope_scaling are the global layers'; the sliding layers'
    base (10k), their pattern (5 sliding : 1 global) and query_pre_attn_scalar are not in the file, and
    llama.cpp takes the same defaults as transformers' Gemma3TextConfig, which the family applies."""
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        hf["rope_scaling"] = rope
    hf.pop("hidden_act")
    hf.update(hidden_activation="gelu_pytorch_tanh", sliding_window=_meta(f, "attention.sliding_window", 4096))


# A new architecture: an entry here, tested against its source and transformers' GGUF loader.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA_TENSORS, permute_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", LLAMA_TENSORS, adapt_config=_qwen2_config),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", LLAMA_TENSORS),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", GEMMA3_TENSORS, norm_offset=1.0,
                           adapt_config=_gemma3_config),
}


def architecture_of(f: GGUFFile) -> Architecture:
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported GGUF "
                              f"architectures: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def hf_name(arch: Architecture, gguf_name: str) -> str | None:
    for pattern, template in arch.tensors:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, template, gguf_name)
    return None


# --- config ------------------------------------------------------------------------------------

def _meta(f: GGUFFile, key: str, default: Any = ..., kind: type = int) -> Any:
    full = f"{f.architecture}.{key}"
    value = f.metadata.get(full, default)
    if value is ...:
        raise CheckpointError(f"{f.path}: GGUF metadata lacks {full!r}")
    if isinstance(value, list) and kind is not list:  # per-layer values (e.g. OpenELM's head counts)
        raise CheckpointError(f"{f.path}: {full} varies per layer ({value[:4]}...), which is not supported")
    return value


def _rope(f: GGUFFile) -> dict:
    params: dict = {"rope_type": "default", "rope_theta": float(_meta(f, "rope.freq_base", 10000.0, float))}
    kind = _meta(f, "rope.scaling.type", "none", str)
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1's per-frequency factors, a tensor instead of a formula
        raise CheckpointError(f"{f.path}: holds rope_freqs.weight (Llama 3.x RoPE scaling as a tensor), which "
                              "is not supported; supported RoPE scaling in GGUF: none, linear, yarn")
    if kind in ("linear", "yarn"):
        params.update(rope_type=kind, factor=float(_meta(f, "rope.scaling.factor", kind=float)))
        original = _meta(f, "rope.scaling.original_context_length", None)
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
    elif kind != "none":
        raise CheckpointError(f"{f.path}: RoPE scaling {kind!r} is not supported; supported: none, linear, yarn")
    return params


def _file_dtype(f: GGUFFile) -> str:
    """What "auto" loads: the float type the weights are stored in; quantized ones dequantize to float32."""
    from gguf import GGMLQuantizationType as Q

    kinds = {t.qtype for t in f.tensors.values() if len(t.dims) > 1}
    return {frozenset({Q.F16}): "float16", frozenset({Q.BF16}): "bfloat16"}.get(frozenset(kinds), "float32")


def gguf_hf_config(f: GGUFFile) -> dict:
    """The config.json a Hugging Face checkpoint of this model would have."""
    arch = architecture_of(f)
    heads = int(_meta(f, "attention.head_count"))
    dim = int(_meta(f, "embedding_length"))
    head_dim = int(_meta(f, "attention.key_length", dim // heads))
    rotary = int(_meta(f, "rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(f"{f.path}: RoPE on {rotary} of {head_dim} head dimensions (partial rotary) is "
                              "not supported")
    tokens = f.metadata.get("tokenizer.ggml.tokens") or []
    hf = {
        "model_type": arch.model_type, "architectures": [arch.hf_architecture],
        "vocab_size": int(_meta(f, "vocab_size", len(tokens))), "hidden_size": dim,
        "num_hidden_layers": int(_meta(f, "block_count")), "intermediate_size": int(_meta(f, "feed_forward_length")),
        "num_attention_heads": heads, "num_key_value_heads": int(_meta(f, "attention.head_count_kv", heads)),
        "head_dim": head_dim, "max_position_embeddings": int(_meta(f, "context_length", 4096)),
        "rms_norm_eps": float(_meta(f, "attention.layer_norm_rms_epsilon", 1e-6, float)),
        "rope_parameters": _rope(f), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in f.tensors, "dtype": _file_dtype(f),
        "bos_token_id": f.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": generation_defaults(f).get("eos_token_id"),  # a list with EOT: kept by a convert
        "pad_token_id": f.metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if not hf["vocab_size"]:
        raise CheckpointError(f"{f.path}: no {f.architecture}.vocab_size and no tokenizer.ggml.tokens")
    if arch.adapt_config:
        arch.adapt_config(f, hf)
    return hf


def generation_defaults(f: GGUFFile) -> dict:
    """generation_config.json's ids: llama.cpp also ends generation at EOT/EOM (end of turn/message)."""
    meta = f.metadata
    keys = [f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(meta[k] for k in keys if k in meta))
    out: dict = {"eos_token_id": eos[0] if len(eos) == 1 else eos} if eos else {}
    for key, field in (("bos_token_id", "bos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{field}_token_id" in meta:
            out[key] = meta[f"tokenizer.ggml.{field}_token_id"]
    return out


# --- tensors -----------------------------------------------------------------------------------

def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head it stores rows (0, d/2, 1, d/2 + 1, ...) as pairs for
    its interleaved RoPE; Hugging Face's rotate-half RoPE wants the two halves. Works on weights and biases."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFTensors:
    """The loader's tensor source for a GGUF file, under Hugging Face names (like ``SafetensorsReader``):
    ``tensors`` (name -> file, shape, type) comes from the header; ``get`` dequantizes one tensor."""

    def __init__(self, path: str | Path, hf: dict | None = None) -> None:
        self.file = open_gguf(path)
        self.directory = self.file.path  # what the loader's messages name
        self.arch = architecture_of(self.file)
        hf = hf or gguf_hf_config(self.file)
        self._heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}
        self._source: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in self.file.tensors.items():
            hf_tensor = hf_name(self.arch, name) or name  # unknown names stay as they are: "unexpected tensors"
            self._source[hf_tensor] = name
            self.tensors[hf_tensor] = TensorInfo(self.file.path, info.shape, _type_name(info.qtype))
        for name in self._source.values():  # refuse an undequantizable type before any data is read
            check_tensor_type(self.file.path, self.file.tensors[name])

    def nbytes(self, name: str) -> int:
        return self.file.tensors[self._source[name]].nbytes

    def get_blocks(self, name: str) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """A weight kept quantized (``GGUFFile.read_blocks``), rows in Hugging Face's order; None if it is not."""
        blocks = self.file.read_blocks(self._source[name])
        proj = name.rsplit(".", 2)[-2]
        if blocks is None or not (self.arch.permute_qk and proj in self._heads):
            return blocks
        kind, *tensors = blocks
        return kind, *(None if t is None else unpermute(t, self._heads[proj]) for t in tensors)

    def get(self, name: str) -> torch.Tensor:
        t = self.file.read(self._source[name])
        proj = name.rsplit(".", 2)[-2]
        if self.arch.permute_qk and proj in self._heads:
            t = unpermute(t, self._heads[proj])
        if self.arch.norm_offset and self._source[name].endswith("norm.weight"):
            t = t - self.arch.norm_offset
        return t


def gguf_tokenizer_and_defaults(path: str | Path) -> tuple[Tokenizer | None, dict]:
    """What ``lucidlm.load`` takes from the metadata besides the model: the tokenizer and generation ids."""
    from .gguf_tokenizer import gguf_tokenizer

    f = open_gguf(path)
    return gguf_tokenizer(f.metadata, str(f.path)), generation_defaults(f)
