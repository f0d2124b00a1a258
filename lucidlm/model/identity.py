"""Which model a head was made for: a cheap identity of a model, recorded next to a head trained on it (a
probe, a reward model) and checked when the head is attached, so that it is never silently used on another
model of the same shape.

The identity is the sha256 of the lucidlm config (without its bookkeeping fields; None for a transformers
model) and, for rows spread over the input embedding matrix, each row's norm and its projection on a fixed ±1
vector — a bf16/fp16 cast moves these well under the tolerance, another model's rows far more.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from torch import nn

FINGERPRINT_ROWS = 16
FINGERPRINT_TOLERANCE = 0.02  # of a row's norm: bf16/fp16 casts move it < 0.3%, another model's rows far more
# change nothing computed (S2-Attn acts in training forwards only)
BOOKKEEPING = ("dtype", "init_std", "bos_token_id", "eos_token_id", "pad_token_id", "s2_attn_group")


def model_identity(model: nn.Module) -> dict:
    """{"config_sha256", "embedding_rows", "embedding_fingerprint"} of a lucidlm or transformers model."""
    from ..config import ModelConfig

    config = None
    if isinstance(model.config, ModelConfig):
        fields = {k: v for k, v in model.config.to_dict().items() if k not in BOOKKEEPING}
        config = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    weight = _input_embedding(model).detach()
    idx = torch.linspace(0, weight.shape[0] - 1, FINGERPRINT_ROWS).round().long().unique()
    rows = weight[idx.to(weight.device)].double().cpu()
    signs = 1.0 - 2.0 * ((torch.arange(rows.shape[1]) * 2654435761 >> 16) & 1).double()  # fixed, no RNG
    stats = torch.stack([rows.norm(dim=1), rows @ signs / math.sqrt(rows.shape[1])], 1)
    return {"config_sha256": config, "embedding_rows": idx.tolist(),
            "embedding_fingerprint": [[float(f"{x:.6g}") for x in row] for row in stats.tolist()]}


def _input_embedding(model: nn.Module) -> torch.Tensor:
    embed = getattr(model, "embed", None)  # lucidlm; transformers models: get_input_embeddings()
    return embed.weight if isinstance(embed, nn.Embedding) else model.get_input_embeddings().weight


def config_differs(saved: dict, mine: dict) -> bool:
    """Both identities hash a lucidlm config, and the hashes differ."""
    theirs, ours = saved.get("config_sha256"), mine["config_sha256"]
    return bool(theirs and ours and theirs != ours)


def same_fingerprint(saved: dict, mine: dict) -> bool:
    """The embedding fingerprints agree within the tolerance (a malformed saved one never does)."""
    theirs = saved.get("embedding_fingerprint")
    if saved.get("embedding_rows") != mine["embedding_rows"] or not isinstance(theirs, list) \
            or len(theirs) != len(mine["embedding_fingerprint"]):
        return False
    try:
        return all(abs(a - b) <= FINGERPRINT_TOLERANCE * max(norm, 1e-12)
                   for (norm, proj), row in zip(mine["embedding_fingerprint"], theirs)
                   for a, b in zip((norm, proj), row, strict=True))
    except (TypeError, ValueError):
        return False
