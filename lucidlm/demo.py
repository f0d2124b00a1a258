"""``lucidlm demo``: the end-to-end path on a model built here, with nothing downloaded.

Builds a small random Llama-architecture model and a byte-level tokenizer, saves them as a
Hugging Face checkpoint directory, loads it back through ``lucidlm.load``, checks the logits
against transformers (when installed), decodes greedily with the engine (KV cache) and checks the
tokens against the recompute-everything reference, then streams a sampled continuation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .api import load
from .checkpoint import FAMILIES, save_model
from .config import from_preset
from .generate.reference import greedy_no_cache
from .model.transformer import Transformer
from .tokenizer import byte_tokenizer

# ChatML with the byte tokenizer's own end-of-sequence token, stored as transformers 5 does
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_demo_checkpoint(out: Path, seed: int = 0) -> Path:
    tok = byte_tokenizer()
    cfg = from_preset("llama-125m", dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704,
                      vocab_size=tok.vocab_size, max_seq_len=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    save_model(model, out, FAMILIES["llama"])
    tok.save(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # so `lucidlm chat -m DIR` works on it
    return out


def hf_max_diff(path: Path, ids: torch.Tensor, logits: torch.Tensor) -> float | None:
    """Max |lucidlm − transformers| logit difference, or None when transformers is absent."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return (ref(ids.cpu()).logits - logits.float().cpu()).abs().max().item()


def run_demo(out: Path, prompt: str, max_new_tokens: int, device: str, dtype: str) -> None:
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    build_demo_checkpoint(out)
    lm = load(out, dtype=dtype, device=device)
    ids = lm.encode(prompt)
    table = Table(title="lucidlm demo — a random Llama-architecture model, saved and reloaded")
    table.add_column("what")
    table.add_column("value")
    table.add_row("checkpoint", str(out))
    table.add_row("parameters", f"{lm.model.num_parameters() / 1e6:.2f} M")
    table.add_row("device / dtype", f"{lm.device} / {str(lm.dtype).replace('torch.', '')}")
    x = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        logits = lm.model(x)
    diff = hf_max_diff(out, x, logits) if lm.dtype == torch.float32 else None
    table.add_row("max |Δlogit| vs transformers", "transformers not installed" if diff is None else f"{diff:.2e}")
    start = time.perf_counter()
    reference = greedy_no_cache(lm.model, ids, max_new_tokens, lm.tokenizer.eos_token_id)
    slow = time.perf_counter() - start
    start = time.perf_counter()
    completion = lm.generate(ids, max_new_tokens=max_new_tokens)[0]
    fast = time.perf_counter() - start
    same = "identical" if completion.token_ids == reference else "DIFFERENT"
    table.add_row("greedy, recomputing everything", f"{len(reference)} tokens in {slow:.2f}s")
    table.add_row("greedy, engine with KV cache", f"{len(completion.token_ids)} tokens in {fast:.2f}s — {same} tokens")
    table.add_row("mean logprob", f"{completion.mean_logprob:.3f}")
    console.print(table)
    console.print(f"[bold]prompt[/bold]: {prompt!r}")
    console.print(f"[bold]continuation[/bold] (random weights, so noise): {completion.text!r}")
    for token in lm.stream(prompt, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=0):
        console.print(token.text, end="", markup=False, highlight=False)
    console.print("  [dim](streamed, temperature 0.8, top-p 0.95, seed 0)[/dim]")
