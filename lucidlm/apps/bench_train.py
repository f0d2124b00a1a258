"""``lucidlm bench --train``: training tokens/s and peak memory, lucidlm vs transformers, same model.

Both train the same random-weight Llama-shaped model (saved by transformers, loaded by lucidlm) on
the same random batch with AdamW (decay on matrices only), the same learning rate and float32.
transformers runs the loop a user writes (``model(input_ids, labels=...).loss``, backward, step);
lucidlm runs its ``Trainer`` step. Each runs in its own process, so peak resident memory (ru_maxrss)
is that implementation's alone. Times are medians over ``steps`` steps after two warm-up steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1408, vocab_size=8000, max_position_embeddings=1024, tie_word_embeddings=False)

_WORKER = r"""
import json, resource, statistics, sys, time
import torch
which, directory, batch, seq, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ids = torch.randint(0, 8000, (batch, seq), generator=torch.Generator().manual_seed(0))
if which == "transformers":
    import transformers
    from lucidlm.train.optim import build_optimizer
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
    opt = build_optimizer(model, 1e-4)
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
else:
    import lucidlm
    from lucidlm.train.trainer import TrainConfig, Trainer
    model = lucidlm.load(directory).model
    data = iter(lambda: {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}, None)
    config = TrainConfig(out_dir=directory + "/run", lr=1e-4, warmup_steps=0, clip_grad_norm=None, progress=False,
                         device="cpu", spike_factor=1e9)
    trainer = Trainer(model, config, data)
    step = trainer._train_step
times = []
for i in range(steps + 2):
    start = time.perf_counter()
    step()
    if i >= 2:
        times.append(time.perf_counter() - start)
print(json.dumps({"tokens_per_s": batch * seq / statistics.median(times),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(which: str, directory: str, batch: int, seq: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _WORKER, which, directory, str(batch), str(seq), str(steps)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{which} training benchmark failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train_bench(batch: int = 4, seq: int = 256, steps: int = 5) -> tuple[dict, dict]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(tmp)
        theirs = _run("transformers", tmp, batch, seq, steps)
        ours = _run("lucidlm", tmp, batch, seq, steps)
    return theirs, ours


def train_table(theirs: dict, ours: dict, batch: int, seq: int) -> str:
    params = "hidden 512, 8 layers, 8 heads / 4 KV heads, ffn 1408, vocab 8000"
    return "\n".join([
        f"Training, float32, AdamW, batch {batch} × {seq} tokens, Llama-shaped ({params})", "",
        "| | transformers | lucidlm | lucidlm ÷ transformers |", "|---|---|---|---|",
        f"| tokens/s | {theirs['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
        f"**{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}×** |",
        f"| peak memory (process RSS) | {theirs['peak_mb']:.0f} MB | {ours['peak_mb']:.0f} MB | "
        f"{ours['peak_mb'] / theirs['peak_mb']:.2f}× |"])


if __name__ == "__main__":
    t, o = run_train_bench()
    print(train_table(t, o, 4, 256))
