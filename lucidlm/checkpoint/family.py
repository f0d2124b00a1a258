"""What a checkpoint family is: how its config.json and tensor names map onto lucidlm's.

A ``Family`` turns a Hugging Face ``config.json`` dict into a ``ModelConfig`` (and back), and
lists ``Rule``s pairing lucidlm parameter names with the checkpoint's tensor names. Most rules
are renames; a few families fuse or transpose tensors (GPT-2's Conv1D, BLOOM's fused QKV), which
a rule expresses as a pair of functions, one per direction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig, RopeScaling
from .errors import CheckpointError

Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


@dataclass
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Convert = same
    to_theirs: Convert = same


@dataclass
class Family:
    model_types: tuple[str, ...]
    to_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict]
    renames: Sequence[tuple[str, str]]  # (our-name regex, their-name template), first match wins
    special: Callable[[ModelConfig, list[str]], list[Rule]] | None = None  # rules that are not renames
    ignored: Sequence[str] = field(default_factory=tuple)  # their tensors that carry nothing to load

    def rules(self, cfg: ModelConfig, our_names: list[str]) -> list[Rule]:
        rules = self.special(cfg, our_names) if self.special else []
        claimed = {n for r in rules for n in r.ours}
        for name in our_names:
            if name in claimed:
                continue
            for pattern, template in self.renames:
                if re.fullmatch(pattern, name):
                    rules.append(Rule((name,), (re.sub(pattern, template, name),)))
                    break
            else:
                raise CheckpointError(f"{self.model_types[0]}: no checkpoint name for parameter {name!r}")
        return rules

    def is_ignored(self, their_name: str) -> bool:
        return any(re.fullmatch(p, their_name) for p in self.ignored)


# --- config.json helpers shared by the families ----------------------------------------------

ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
}


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"config.json: unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def read_rope(hf: dict) -> tuple[float, RopeScaling]:
    """rope theta and scaling from either dialect: 5.x ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling`` (whose type key is ``rope_type`` or, older still, ``type``)."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    d = {**legacy, **params}
    kind = d.get("rope_type") or d.get("type") or "default"
    supported = ("default", "linear", "dynamic", "yarn", "llama3")
    if kind not in supported:
        raise CheckpointError(f"config.json: unsupported RoPE scaling {kind!r}; supported: {list(supported)}")
    if kind == "default":
        return float(theta), RopeScaling()
    max_pos = hf.get("max_position_embeddings")
    original = d.get("original_max_position_embeddings") or max_pos
    if kind == "dynamic":
        original = max_pos  # HF's dynamic NTK measures growth against max_position_embeddings
    factor = d.get("factor")
    if factor is None and kind == "yarn":
        factor = max_pos / original
    s = RopeScaling(type=kind, factor=float(factor), original_max_seq_len=original)
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        if d.get(key) is not None:
            setattr(s, key, float(d[key]))
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if d.get(key) is not None:
            setattr(s, key, float(d[key]))
    if "truncate" in d:
        s.truncate = bool(d["truncate"])
    return float(theta), s


def write_rope(cfg: ModelConfig) -> dict:
    """The 5.x ``rope_parameters`` dict for a config; a scaling transformers has no ``rope_type`` for is refused
    (written, it would make a config.json that neither transformers nor ``read_rope`` loads)."""
    s = cfg.rope_scaling
    if s.type in ("ntk", "ntk_by_parts"):
        raise CheckpointError(f"RoPE scaling {s.type!r} has no transformers rope_type, so a Hugging Face config.json "
                              "cannot hold it; save in lucidlm's own layout (family 'lucidlm'), or apply the scaling "
                              "after loading (ModelConfig.rope_scaling)")
    out: dict = {"rope_type": s.type, "rope_theta": cfg.rope_theta}
    if s.type != "default":
        out["factor"] = s.factor
        if s.type != "dynamic":
            out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(s, key) is not None:
                out[key] = getattr(s, key)
    return out


def common_hf_fields(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.dtype,
    }


def common_fields(hf: dict) -> dict:
    """ModelConfig fields every family reads the same way."""
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dict(
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), dtype=str(dtype).replace("torch.", ""),
    )


def require(hf: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise CheckpointError(f"config.json of model_type {hf.get('model_type')!r} lacks required fields {missing}")


def check_unsupported(hf: dict, checks: dict[str, object]) -> None:
    """Refuse configs whose options lucidlm would silently compute differently."""
    for key, expected in checks.items():
        if key in hf and hf[key] not in (None, expected):
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported (expected {expected!r})")
