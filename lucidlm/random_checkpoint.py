"""A small random Llama-architecture model with a byte-level tokenizer, saved as a Hugging Face
checkpoint directory: what tests and examples load when no trained model is at hand."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import FAMILIES, save_model
from .config import from_preset
from .model.transformer import Transformer
from .tokenizer import byte_tokenizer

# ChatML with the byte tokenizer's own end-of-sequence token, stored as transformers 5 does
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_random_checkpoint(out: Path, seed: int = 0, max_seq_len: int = 512) -> Path:
    tok = byte_tokenizer()
    cfg = from_preset("llama-125m", dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704,
                      vocab_size=tok.vocab_size, max_seq_len=max_seq_len, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    out = Path(out)
    save_model(model, out, FAMILIES["llama"])
    tok.save(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # so `lucidlm chat -m DIR` works on it
    return out
