"""``lucidlm bench --adapters``: LoRA vs bottleneck adapters vs full fine-tuning, same data, seed, steps and LR.

Each method is one ``lucidlm sft`` run (``run_sft``: the code path a user's command takes) on the same base
checkpoint and the same SFT rows — the synthetic world's "Tell me about X." conversations (``world/build.py``,
offline) — with the same seed, steps, batch, learning rate and schedule. Reported per method: trainable
parameters (counted in what the run saved: the adapter's tensors, or the whole model), the training loss at the
first step and its mean over the last 10% of steps, the median seconds per step and the run's wall time.
The default base is ``random_checkpoint.py``'s small random Llama (nothing to download); ``model`` takes any
checkpoint with a tokenizer and a chat template.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

METHODS = ("lora", "bottleneck", "full")


@dataclass
class AdapterBench:
    steps: int = 50
    batch_size: int = 4
    max_len: int = 160
    lr: float = 2e-3
    lora_r: int = 8
    bottleneck_size: int = 32
    people: int = 120  # people in the synthetic world: half of them get an SFT conversation
    seed: int = 0


def _saved_parameters(directory: Path) -> int:
    """Elements of every tensor the run saved (the adapter's files, or the model's safetensors)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _run(method: str, base: Path, data: Path, out: Path, bench: AdapterBench) -> dict:
    from ..train.metrics import read_metrics
    from ..train.trainer import TrainConfig
    from .train_recipes import BottleneckOptions, LoRAOptions, SFTRun, run_sft

    train = TrainConfig(out_dir=str(out), max_steps=bench.steps, lr=bench.lr, warmup_steps=max(1, bench.steps // 10),
                        save_every=bench.steps, eval_every=bench.steps, seed=bench.seed, device="cpu")
    run = SFTRun(model=str(base), data=[str(data)], max_len=bench.max_len, batch_size=bench.batch_size, train=train,
                 lora=LoRAOptions(r=bench.lora_r, alpha=2.0 * bench.lora_r, dropout=0.0) if method == "lora" else None,
                 bottleneck=BottleneckOptions(size=bench.bottleneck_size) if method == "bottleneck" else None)
    start = time.perf_counter()
    _, final, _ = run_sft(run)
    wall = time.perf_counter() - start
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    tail = records[-max(1, len(records) // 10):]
    return {"method": method, "trainable": _saved_parameters(final), "first_loss": records[0]["loss"],
            "final_loss": statistics.mean(r["loss"] for r in tail),
            "s_per_step": statistics.median(r["tokens"] / r["tokens_per_s"] for r in records), "wall_s": wall}


def run_adapter_bench(bench: AdapterBench, model: Path | None = None,
                      print_fn: Callable[[str], None] = print) -> dict:
    """{"rows": one dict per method, "total": the base's parameters, ...the settings}."""
    import torch

    from ..checkpoint import load_model
    from ..random_checkpoint import build_random_checkpoint
    from ..world.build import WorldConfig, build_world

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(model) if model is not None else build_random_checkpoint(Path(tmp) / "base", seed=bench.seed)
        build_world(Path(tmp) / "world", WorldConfig(seed=bench.seed, people=bench.people))
        data = Path(tmp) / "world" / "sft.jsonl"
        total = load_model(base, dtype=torch.float32).model.num_parameters()
        rows = []
        for method in METHODS:
            rows.append(_run(method, base, data, Path(tmp) / method, bench))
            print_fn(f"done: {method} ({rows[-1]['wall_s']:.0f} s)")
        examples = sum(1 for line in data.read_text().splitlines() if line.strip())
    return {"rows": rows, "total": total, "examples": examples, "base": str(model or "random checkpoint"),
            "bench": bench}


def adapter_table(result: dict) -> str:
    b: AdapterBench = result["bench"]
    lines = ["| method | trainable params | % of the model | loss at step 1 | loss after "
             f"{b.steps} steps | s / step | wall time |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = {"lora": f"LoRA (r={b.lora_r}, all linear layers)",
                "bottleneck": f"bottleneck adapters (m={b.bottleneck_size}, attn + mlp)",
                "full": "full fine-tuning"}[r["method"]]
        lines.append(f"| {name} | {r['trainable']:,} | {100 * r['trainable'] / result['total']:.2f}% "
                     f"| {r['first_loss']:.3f} | **{r['final_loss']:.3f}** | {r['s_per_step']:.2f} "
                     f"| {r['wall_s']:.0f} s |")
    return ("\n".join(lines) + f"\n\nbase: {result['base']} ({result['total']:,} parameters); data: "
            f"{result['examples']} synthetic-world conversations; batch {b.batch_size}, max_len {b.max_len}, "
            f"lr {b.lr} (warmup + cosine), seed {b.seed}, float32 on CPU. Loss: training loss on the assistant "
            "tokens, mean of the last 10% of steps.")
