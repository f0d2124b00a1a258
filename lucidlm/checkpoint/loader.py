"""Load a Hugging Face checkpoint directory into a lucidlm ``Transformer``, and save one back.

Loading is lazy: the model is built on the meta device (no memory), every expected tensor is
checked against the file headers (missing, unexpected, mis-shaped — all reported before any data
is read), then tensors are read one by one from the memory-mapped files, cast, and assigned.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MAX_EOS_IDS, ModelConfig
from ..jsonl import write_json
from ..model.fused_projections import fuse_projections
from ..model.linear import Linear
from ..model.quantize import fits, quantizable, quantize_model, replace
from ..model.quantized_linear import QuantizedLinear, choose_kernel, scheme
from ..model.transformer import Transformer
from ..progress import progress_bar
from ..tokenizer import Tokenizer
from . import bloom, deepseek, gemma3, gpt2, llama_family, native
from .bert import ENCODER_MODEL_TYPES
from .errors import CheckpointError
from .family import Family, Rule, same
from .files import checkpoint_file, has_file, read_json
from .gguf import GGUFTensors, find_gguf, gguf_hf_config, gguf_tokenizer_and_defaults, open_gguf
from .local_models import resolve_model_path
from .safetensors_io import SafetensorsReader, require_float, write_safetensors

FAMILIES: dict[str, Family] = {
    kind: fam
    for module in (llama_family, gemma3, deepseek, gpt2, bloom, native)
    for fam in module.FAMILIES
    for kind in fam.model_types
}
SUPPORTED_MODEL_TYPES = sorted(FAMILIES)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Loaded:
    model: Transformer
    config: ModelConfig
    family: Family
    hf_config: dict


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = cfg.dtype if cfg is not None else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def read_hf_config(directory: str | Path) -> tuple[dict, Family, ModelConfig]:
    """config.json of a checkpoint directory, or the equivalent of a GGUF file (see checkpoint/gguf.py)."""
    directory = resolve_model_path(directory)
    if (file := find_gguf(directory)) is not None:
        return _family_config(gguf_hf_config(open_gguf(file)), file)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not has_file(directory, "config.json"):
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    return _family_config(read_json(directory, "config.json"), directory / "config.json")


def _family_config(hf: dict, path: Path) -> tuple[dict, Family, ModelConfig]:
    kind = hf.get("model_type")
    if kind in ENCODER_MODEL_TYPES:  # a masked LM: nothing to generate with, so not an LM of lucidlm.load
        raise CheckpointError(f"{path}: model_type {kind!r} is an encoder-only masked LM, not a causal LM: "
                              "load it with lucidlm.load_encoder(path)")
    if kind not in FAMILIES:
        raise CheckpointError(
            f"{path}: unsupported model_type {kind!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family = FAMILIES[kind]
    try:
        cfg = family.to_config(hf)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # e.g. a field of the wrong JSON type
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read a {kind} config ({type(e).__name__}: {e})") from e
    check_token_ids(hf, cfg.vocab_size, path)  # the raw ids too: LM.eos_token_ids reads them
    return hf, family, cfg


def _our_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, without the tied lm_head (it is the embedding)."""
    named = dict(model.state_dict(keep_vars=True))
    if model.config.tie_embeddings:
        named.pop("lm_head.weight", None)
    return named


def _check(reader: SafetensorsReader, rules: list[Rule], ours: dict[str, torch.Tensor], family: Family,
           tied: bool) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:  # their shapes follow from ours by converting meta tensors: no data needed
        metas = [torch.empty(ours[n].shape, device="meta") for n in rule.ours]
        for name, t in zip(rule.theirs, rule.to_theirs(metas)):
            expected[name] = tuple(t.shape)
    found = reader.tensors
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{reader.directory}: missing tensors {missing[:10]}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    extra = sorted(n for n in set(found) - set(expected)
                   if not family.is_ignored(n) and not (tied and n == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{reader.directory}: unexpected tensors {extra[:10]}"
                              + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    require_float(found, list(expected))
    for name, shape in expected.items():
        if found[name].shape != shape:
            raise CheckpointError(
                f"{found[name].file}: tensor {name!r} has shape {list(found[name].shape)}, "
                f"but the config expects {list(shape)}"
            )


def load_model(directory: str | Path, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device = "cpu", progress: bool | None = None, quantize: str = "none") -> Loaded:
    """directory: a checkpoint directory, a .gguf file (or a directory holding one) or a named local model.
    progress: draw a bar while reading (None: for checkpoints over 256 MiB on a terminal).
    quantize: "none" (float weights), "gguf" (a GGUF file's Q4_0 / Q4_1 / Q8_0 linear weights stay as they are
    stored; other types are read as float, and Q8_0 too where only torch's kernels run: they have none for it), or
    "int8" / "int4" (every linear layer quantized after reading; see model/quantized_linear.py)."""
    check_quantize(quantize, device)
    directory = resolve_model_path(directory)
    hf, family, cfg = read_hf_config(directory)
    torch_dtype = resolve_dtype(dtype, cfg)
    file = find_gguf(directory)
    if quantize == "gguf" and file is None:
        raise ValueError(f"quantize='gguf' keeps a GGUF file's quantized weights; {directory} is not GGUF "
                         "(quantize='int8' or 'int4' quantizes any checkpoint)")
    reader = SafetensorsReader(directory) if file is None else GGUFTensors(file, hf)
    with torch.device("meta"):
        model = Transformer(cfg)
    ours = _our_tensors(model)
    rules = family.rules(cfg, list(ours))
    _check(reader, rules, ours, family, cfg.tie_embeddings)

    state: dict[str, torch.Tensor] = {}
    total = sum(reader.nbytes(n) for rule in rules for n in rule.theirs)
    if progress is None and total < 256 * 2**20:
        progress = False  # small checkpoints load in a blink; None leaves it to whether stderr is a terminal
    with progress_bar(total, f"loading {Path(directory).name}", progress, unit_bytes=True) as advance:
        for rule in rules:
            if quantize == "gguf" and _keep_quantized(model, reader, rule, torch_dtype, state):
                advance(sum(reader.nbytes(n) for n in rule.theirs))
                continue
            converted = rule.to_ours([reader.get(n) for n in rule.theirs])
            for name, t in zip(rule.ours, converted):
                # router statistics stay float32, like the reference implementations keep them
                keep_fp32 = name.endswith("e_score_correction_bias")
                state[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else torch_dtype).contiguous()
            advance(sum(reader.nbytes(n) for n in rule.theirs))
    if cfg.tie_embeddings and isinstance(model.lm_head, Linear):
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.init_buffers(device)
    model.eval()
    if quantize in ("int8", "int4"):
        quantize_model(model, quantize)
    if quantize == "gguf":
        fuse_projections(model)
    return Loaded(model, cfg, family, hf)


QUANTIZE = ("none", "gguf", "int8", "int4")


def check_quantize(quantize: str, device: str | torch.device) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)}")
    if quantize != "none" and torch.device(device).type != "cpu":
        raise ValueError(f"quantized weights run on CPU (lucidlm's and torch's CPU kernels); the device is {device}")


def _keep_quantized(model: Transformer, reader, rule: Rule, dtype: torch.dtype, state: dict) -> bool:
    """A linear weight the GGUF file stores as Q4_0 / Q4_1 / Q8_0: its layer becomes a ``QuantizedLinear`` of those
    integers and scales (its buffers go into ``state``); False for anything else. A tied lm_head gets the
    quantized embedding's blocks, as llama.cpp multiplies by them; the lookup keeps the float embedding."""
    name = rule.ours[0]
    if len(rule.ours) != 1 or rule.to_ours is not same or not name.endswith(".weight"):
        return False
    tied_head = name == "embed.weight" and model.config.tie_embeddings
    target = "lm_head" if tied_head else name.removesuffix(".weight")
    if not quantizable(target, model.get_submodule(target)):
        return False
    blocks = reader.get_blocks(rule.theirs[0])
    if blocks is None:
        return False
    kind, q, d, m = blocks
    linear = model.get_submodule(target)
    if not fits(scheme(kind), linear.in_features, linear.out_features):
        return False  # read as float (torch's int4 packing wants rows in 16s)
    if kind == "q8_0" and choose_kernel(linear.in_features) == "torch":
        return False  # torch has no kernel for int8 in groups: float is faster
    layer = QuantizedLinear(linear.in_features, linear.out_features, scheme(kind), None, q, d.to(dtype),
                            None if m is None else m.to(dtype))
    layer.bias = linear.bias  # meta until the state assigns it (biases have rules of their own)
    replace(model, target, layer)
    state.update({f"{target}.{k}": v for k, v in layer.state_dict().items() if k != "bias"})
    return not tied_head  # the embedding itself is still read, as float, for the lookup


def load_tokenizer(directory: str | Path, cfg: ModelConfig) -> tuple[Tokenizer | None, dict]:
    """The checkpoint's tokenizer (None without tokenizer.json) and generation_config.json (or a GGUF file's
    equivalents), their token ids checked against the model's ``vocab_size``: an id past the embedding
    would fail inside a forward, for every sequence batched with it."""
    directory = resolve_model_path(directory)
    if (file := find_gguf(directory)) is not None:
        tokenizer, defaults = gguf_tokenizer_and_defaults(file)
        source, gen_source = file, file
    else:
        tokenizer, defaults = Tokenizer.from_dir(directory), read_generation_config(directory)
        source, gen_source = directory / "tokenizer.json", directory / "generation_config.json"
    check_token_ids(defaults, cfg.vocab_size, gen_source)
    if tokenizer is not None and (largest := tokenizer.max_token_id()) >= cfg.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has token ids up to {largest}, but the model's embedding "
                              f"has {cfg.vocab_size} rows (vocab_size); those tokens cannot be looked up")
    return tokenizer, defaults


def read_generation_config(directory: str | Path) -> dict:
    """generation_config.json ({} when there is none)."""
    return read_json(directory, "generation_config.json") if has_file(directory, "generation_config.json") else {}


def check_token_ids(config: dict, vocab_size: int, path: Path) -> None:
    """bos/eos/pad ids of a config dict: token ids of the model, and not thousands of them."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = config.get(key)
        ids = value if isinstance(value, list) else [value]
        if len(ids) > MAX_EOS_IDS:
            raise CheckpointError(f"{path}: {key} lists {len(ids)} ids (at most {MAX_EOS_IDS})")
        bad = [i for i in ids if i is not None and not (type(i) is int and 0 <= i < vocab_size)]
        if bad:
            raise CheckpointError(f"{path}: {key} {bad[0]!r} is not a token id of this model "
                                  f"(0 <= id < vocab_size={vocab_size})")


def save_model(model: Transformer, directory: str | Path, family: Family | None = None,
               hf_config: dict | None = None, source: str | Path | None = None,
               max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json + safetensors in the family's Hugging Face layout (lucidlm's own layout
    when no family is given), copying tokenizer files from ``source`` when given."""
    directory = Path(directory)
    cfg = model.config
    family = family or FAMILIES["lucidlm"]
    out_cfg = dict(hf_config) if hf_config else family.to_hf_config(cfg)  # a config it cannot hold: before writing
    directory.mkdir(parents=True, exist_ok=True)
    ours = {n: t.detach() for n, t in _our_tensors(model).items()}
    tensors: dict[str, torch.Tensor] = {}
    for rule in family.rules(cfg, list(ours)):
        for name, t in zip(rule.theirs, rule.to_theirs([ours[n] for n in rule.ours])):
            tensors[name] = t
    write_safetensors(directory, tensors, max_shard_bytes)
    dtypes = {t.dtype for t in ours.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).replace("torch.", "")
        out_cfg["dtype"] = name
        out_cfg.pop("torch_dtype", None)
        if "lucidlm_config" in out_cfg:
            out_cfg["lucidlm_config"] = {**out_cfg["lucidlm_config"], "dtype": name}
    write_json(directory / "config.json", out_cfg)
    if source is not None and Path(source).resolve() != directory.resolve():
        for fname in TOKENIZER_FILES:  # the source is a checkpoint like any other: its links stay inside it
            if has_file(source, fname):
                shutil.copyfile(checkpoint_file(source, fname), directory / fname)
    return directory
