"""Tiny random lucidlm models for engine and API tests (no checkpoint, no download)."""

from __future__ import annotations

import torch

from lucidlm.api import LM
from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.probe.probe import LoadedProbe, ProbeConfig, ProbeHead
from lucidlm.tokenizer import byte_tokenizer


def tiny_model(preset: str = "llama-125m", seed: int = 0, sharpen: float = 15.0, **overrides) -> Transformer:
    """A random tiny model; weights are scaled up because the 0.02-std init gives near-uniform,
    tie-prone logits, and greedy comparisons need clear winners."""
    model = Transformer(from_preset(preset, tiny=True, **overrides)).eval()
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(sharpen)
    return model


def tiny_lm(preset: str = "llama-125m", seed: int = 0, **overrides) -> LM:
    """A tiny model with the byte-level tokenizer (256 bytes + <|bos|> 256, <|eos|> 257, <|pad|> 258)."""
    tok = byte_tokenizer()
    model = tiny_model(preset, seed, vocab_size=tok.vocab_size, **overrides)
    return LM(model, tok, model.config)


def random_probe(lm: LM, layer: int, alignment: str = "own", seed: int = 0) -> LoadedProbe:
    """A random probe head for ``lm`` on block ``layer`` (weights large enough that scores vary token to token)."""
    torch.manual_seed(seed)
    head = ProbeHead(lm.config.dim)
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.05)
    config = ProbeConfig(layer=layer, hidden_size=lm.config.dim, n_layers=lm.config.n_layers, alignment=alignment)
    return LoadedProbe(head.to(lm.device).eval(), config)
