"""``lucidlm bench``: lucidlm and transformers side by side on the same random-weight model.

Both run greedy generation of ``new`` tokens after a ``prompt``-token prompt, with EOS ignored, in
the same process on the same weights (a transformers Llama saved to disk and loaded by lucidlm).
lucidlm runs three ways: "eager" (``compile="off"``); "default", as ``lucidlm.load`` gives it (decode steps compiled
once per machine and shape and kept on disk, generate/compiled_steps.py; the first call's build time and a later
load's are reported); and "packed": oneDNN-packed weights (a second copy) with compiled steps, the fastest path
before compiled steps were the default.
For each case:
- prefill tok/s: prompt tokens ÷ time of generating 1 token (one forward over the prompt);
- decode tok/s: batch × (new − 1) ÷ (time of ``new`` tokens − time of 1 token);
- the memory-bandwidth bound: measured read bandwidth ÷ bytes a decode step must read (every
  weight except the embedding table, plus the KV cache at mid-generation). A batch-1 decode
  step cannot beat it; the ratio to it says how much of the machine an implementation uses.
Times are medians of ``repeats`` runs; the machines are noisy, so compare ratios within one run.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
OVERHEAD_BOUND = dict(LLAMA_125M, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      vocab_size=512)


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    batch: int


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes/s of streaming a 1 GiB tensor through a reduction (what weight reads look like); median."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()  # touch the pages first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return n_bytes / statistics.median(times)


def decode_bytes(model: torch.nn.Module, batch: int, context: int) -> int:
    """Bytes read by one decode step: weights (``decode_weight_bytes``) + the KV cache."""
    cfg = model.config
    itemsize = model.embed.weight.element_size()
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize * context * batch
    return decode_weight_bytes(model) + kv


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights (and quantized layers' integers and scales) one decode step reads: everything but the
    embedding, which is only gathered; a head tied to it is counted under lm_head, in full."""
    from ..model.quantized_linear import QuantizedLinear

    total, seen = 0, set()
    for name, module in model.named_modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, QuantizedLinear):
            tensors += list(module.buffers(recurse=False))
        for t in tensors:
            if name == "embed" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init, compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hf_runner(hf, ids: torch.Tensor) -> Callable[[int], Callable[[], object]]:
    def run(new: int):
        return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
    return run


def _ours_runner(lm, ids: torch.Tensor, way: str = "eager", ready: dict | None = None
                 ) -> Callable[[int], Callable[[], object]]:
    """way: "eager", "default" (compiled steps; ``ready`` gets the seconds the first call spent building them and
    what loading them from disk takes, as a later process would) or "packed"."""
    from ..generate.compiled_steps import CompiledSteps
    from ..generate.generation_config import GenerationConfig
    from ..generate.offline import Generator
    from ..model.cpu_kernels import pack_linears, packable, unpack_linears

    if way == "packed" and packable(lm.dtype):  # oneDNN packs bf16/fp16 only on AVX-512 CPUs: else compile alone
        pack_linears(lm.model, rows=ids.shape[0])
    else:
        unpack_linears(lm.model)
    engine = Generator(lm.model, compile="off" if way == "eager" else "on")
    prompts = ids.tolist()

    def run(new: int):
        config = GenerationConfig(max_new_tokens=new, ignore_eos=True)
        return lambda: engine.generate(prompts, config)
    if way == "default" and ready is not None:  # the first call builds the steps it needs
        steps = CompiledSteps.for_model(lm.model)
        before, shapes = (steps.compiled, steps.loaded, steps.seconds), set(steps.ready)
        run(ready["new"])()
        fresh = CompiledSteps(lm.model)  # a later process: the same shapes, from disk
        start = time.perf_counter()
        for shape in set(steps.ready) - shapes:
            fresh.get(shape)
        ready.update(seconds=steps.seconds - before[2], compiled=steps.compiled - before[0],
                     loaded=steps.loaded - before[1], load_seconds=time.perf_counter() - start)
    return run


def measure(runner, batch: int, prompt: int, new: int, repeats: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, seconds per decode step). A decode step is the difference of two medians: on a
    busy machine, with a tiny model and few repeats, the noise can exceed it; then the decode figures are NaN (shown
    as "—"), not a negative or absurd rate."""
    t1 = _median_time(runner(1), repeats)
    tn = _median_time(runner(new), repeats)
    step = (tn - t1) / (new - 1)
    if step <= 0:
        return batch * prompt / t1, math.nan, math.nan
    return batch * prompt / t1, batch / step, step


def _random_ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def build_pair(shape: dict, directory: Path, dtype: torch.dtype):
    """The same random weights as a transformers model and as a lucidlm LM."""
    import transformers

    from ..api import load

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    hf.save_pretrained(directory)
    hf = hf.to(dtype)
    lm = load(directory, dtype=str(dtype).removeprefix("torch."), device="cpu")
    return hf, lm


def run_bench(prompt: int = 64, new: int = 128, repeats: int = 3, batches: tuple[int, ...] = (1, 8),
              dtypes: tuple[str, ...] = ("float32", "bfloat16"), threads: int | None = None,
              print_fn: Callable[[str], None] = print) -> tuple[list[dict], float]:
    """Measure every case; returns (rows, measured read bandwidth in bytes/s)."""
    if threads:
        torch.set_num_threads(threads)
    bandwidth = read_bandwidth()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            hf, lm = build_pair(LLAMA_125M, Path(tmp) / dtype_name, dtype)
            for batch in batches:
                ids = _random_ids(LLAMA_125M["vocab_size"], batch, prompt)
                theirs = measure(_hf_runner(hf, ids), batch, prompt, new, repeats)
                ready = {"new": new}
                ways = {way: measure(_ours_runner(lm, ids, way, ready), batch, prompt, new, repeats)
                        for way in ("eager", "default", "packed")}
                bound = batch * bandwidth / decode_bytes(lm.model, batch, prompt + new // 2)
                rows.append(dict(case=f"125M {dtype_name} batch {batch}", hf=theirs, **ways, ready=ready,
                                 bound=bound, prompt=prompt))
                print_fn(f"done: {rows[-1]['case']}")
            del hf, lm
        hf, lm = build_pair(OVERHEAD_BOUND, Path(tmp) / "tiny", torch.float32)
        ids = _random_ids(OVERHEAD_BOUND["vocab_size"], 1, prompt)
        theirs = measure(_hf_runner(hf, ids), 1, prompt, new, repeats)
        ready = {"new": new}
        ways = {way: measure(_ours_runner(lm, ids, way, ready), 1, prompt, new, repeats)
                for way in ("eager", "default", "packed")}
        rows.append(dict(case="overhead-bound (12 layers, hidden 64) float32 batch 1", hf=theirs, **ways,
                         ready=ready, bound=None, prompt=prompt))
        print_fn("done: overhead-bound")
    return rows, bandwidth


def markdown_table(rows: list[dict], bandwidth: float) -> str:
    """Two tables: decode (tok/s, ratios, share of the bandwidth bound, the default's wait) and prefill."""
    decode = ["| case | transformers | lucidlm eager | **lucidlm default** | packed + compiled "
              "| default ÷ transformers | default ÷ packed | bound | default % of bound | default's first call |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    prefill = ["| case | transformers | lucidlm eager / default | packed | default ÷ transformers |",
               "|---|---|---|---|---|"]
    for r in rows:
        (hp, hd, _), (ep, ed, _), (dp, dd, _), (pp, pd, _) = r["hf"], r["eager"], r["default"], r["packed"]
        bound, share = (f"{r['bound']:.0f}", f"{100 * dd / r['bound']:.0f}%") if r["bound"] else ("—", "—")
        w = r["ready"]
        how = f"compiled {w['seconds']:.0f} s, then loads in {w['load_seconds']:.1f} s" if w.get("compiled") else \
            f"loaded in {w['seconds']:.1f} s" if w.get("loaded") else "built earlier in this run"
        decode.append(f"| {r['case']} | {hd:.1f} | {ed:.1f} | **{dd:.1f}** | {pd:.1f} | **{dd / hd:.2f}×** "
                      f"| {dd / pd:.2f}× | {bound} | {share} | {how} |")
        prefill.append(f"| {r['case']} | {hp:.0f} | {ep:.0f} / {dp:.0f} | {pp:.0f} | **{dp / hp:.2f}×** |")
    return ("Decode tok/s (batch × tokens per second after the first token)\n\n" + "\n".join(decode)
            + f"\n\nPrefill tok/s ({rows[0]['prompt']}-token prompts)\n\n" + "\n".join(prefill)
            + f"\n\nbound = measured read bandwidth ({bandwidth / 1e9:.1f} GB/s) ÷ bytes a decode step reads "
            "(weights but the embedding, plus the KV cache at mid-generation). default's first call: the time it "
            "spent building its decode steps (once per machine and shape) and what loading them takes later.")
