"""``lucidlm bench --quant``: what quantized weights buy (decode and prefill speed, bytes) and cost (perplexity,
greedy agreement), per format, measured side by side in one run on one model.

Formats: the float32 and bfloat16 models, ``quantize="int8"`` / ``"int4"`` (model/quantized_linear.py), and, for a
GGUF file, its own quantized weights as stored (``quantize="gguf"``). Every format is loaded from the same file,
with the engine's default decode path (compiled steps). Columns:

- decode tok/s at batch 1 and the aggregate at batch 8, prefill tok/s of the prompts (``bench.measure``);
- bound: measured read bandwidth ÷ the bytes one batch-1 decode step reads (weights and scales, the head's
  weight even when tied to the embedding, the KV cache at mid-generation), and the share of it reached;
- perplexity on a fixed English text the project never trains on (CPython's LICENSE), in windows;
- greedy agreement: the fraction of 256 greedy tokens, over fixed prompts, equal position by position to the
  bfloat16 model's (the reference the issue asks for);
- the main job's probe per format (``demo``: a finished ``lucidlm demo`` directory): the float32-trained probe
  reading each format's states on the demo's held-out test answers, span-max AUROC with a 95% bootstrap CI over
  entities, beside the format's own NLL (probe/benchmark.held_out_auroc). The answers stay the float model's.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench import _ours_runner, decode_bytes, decode_weight_bytes, measure, read_bandwidth

PROMPTS = ["The history of the printing press", "Photosynthesis is the process by which",
           "A short story about a lighthouse keeper:", "The three laws of thermodynamics are"]
AGREEMENT_TOKENS = 256
PERPLEXITY_WINDOW = 256
PERPLEXITY_TOKENS = 2048
RANDOM_125M = "random-125m"  # --model: `lucidlm bench`'s random Llama-shaped 125M (speed columns only)


@dataclass
class QuantRow:
    label: str
    weight_bytes: int  # read by one batch-1 decode step (weights and scales, not the embedding lookup)
    decode_1: float  # tok/s
    decode_8: float  # aggregate tok/s
    prefill: float  # tok/s
    bound_1: float  # tok/s at batch 1
    perplexity: float
    agreement: float  # of AGREEMENT_TOKENS × prompts greedy tokens equal to the bfloat16 model's
    probe: dict | None = None  # {"probe": auroc_ci, "nll": auroc_ci} on the demo's test claims (None: no demo)


def formats(path: Path) -> list[tuple[str, dict]]:
    """(label, lucidlm.load options) of every format this model can be measured in."""
    from ..checkpoint.gguf import find_gguf, open_gguf
    from ..checkpoint.local_models import resolve_model_path

    out = [("float32", dict(dtype="float32", quantize="none")), ("bfloat16", dict(dtype="bfloat16", quantize="none")),
           ("int8", dict(dtype="float32", quantize="int8")), ("int4", dict(dtype="float32", quantize="int4"))]
    file = find_gguf(resolve_model_path(path))
    if file is not None:
        kinds = sorted({t for t in _linear_types(open_gguf(file))})
        out.append((f"GGUF as stored ({', '.join(kinds)})", dict(dtype="float32", quantize="gguf")))
    return out


def _linear_types(f) -> list[str]:
    from ..checkpoint.gguf import _type_name

    return [_type_name(i.qtype) for n, i in f.tensors.items() if len(i.dims) == 2 and not n.startswith("token_embd")]


def perplexity(lm, text: str) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the text's first PERPLEXITY_TOKENS tokens."""
    ids = lm.encode(text)[:PERPLEXITY_TOKENS]
    losses, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, PERPLEXITY_WINDOW):
            window = torch.tensor([ids[start:start + PERPLEXITY_WINDOW + 1]], device=lm.device)
            if window.shape[1] < 2:
                break
            logits = lm.model(window[:, :-1]).float()
            losses += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(losses / count)


def reference_text() -> str:
    """CPython's LICENSE: fixed English prose (history and legal text) shipped with every interpreter."""
    for base in (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}",
                 Path(sys.base_prefix)):
        if (base / "LICENSE.txt").exists():
            return (base / "LICENSE.txt").read_text(errors="replace")
    raise FileNotFoundError(f"no LICENSE.txt under {sys.base_prefix}: the perplexity text")


def greedy(lm) -> list[list[int]]:
    """Eager steps: the tokens do not depend on the path, and compiling this batch's shapes would cost minutes."""
    mode, lm.compile_decode = lm.compile_decode, "off"
    try:
        return [c.token_ids for c in lm.generate(PROMPTS, max_new_tokens=AGREEMENT_TOKENS, ignore_eos=True)]
    finally:
        lm.compile_decode = mode


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(a == b for x, y in zip(ours, reference) for a, b in zip(x, y))
    return same / sum(len(y) for y in reference)


LLAMACPP_INSTALL = ("pip install 'lucidlm[llamacpp]' (llama-cpp-python, which builds llama.cpp from source: a C++ "
                    "compiler and a few minutes)")


def llamacpp_row(file: Path, prompt: int, new: int, repeats: int, bandwidth: float,
                 batch_prompts: list[list[int]]) -> QuantRow:
    """llama.cpp on the very same GGUF file (``llamacpp_file``), same threads and token counts: batch-1 decode and
    prefill tok/s after lucidlm's prompt, and the aggregate decode of ``batch_prompts`` (lucidlm's batch-8
    prompts) decoded together (``llamacpp_batch_decode``); perplexity and agreement are lucidlm's columns."""
    import time

    import llama_cpp

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(file), n_threads=threads, n_threads_batch=threads, n_ctx=prompt + new + 8,
                          verbose=False)
    ids = llm.tokenize(reference_text().encode(), add_bos=False)[:prompt]  # lucidlm's prompt: the same tokens

    def run(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        for _ in range(n - 1):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])  # greedy, as lucidlm's runs
        return time.perf_counter() - start

    run(2)  # warm-up
    t1 = sorted(run(1) for _ in range(repeats))[repeats // 2]
    tn = sorted(run(new) for _ in range(repeats))[repeats // 2]
    decode_8 = llamacpp_batch_decode(llm, batch_prompts, new, repeats)
    weights = file.stat().st_size  # every tensor is read per token but the embedding's other rows: an upper bound
    return QuantRow(f"llama.cpp {llama_cpp.__version__} (the file as stored)", weights, (new - 1) / (tn - t1),
                    decode_8, len(ids) / t1, bandwidth / weights, float("nan"), float("nan"))


def llamacpp_batch_decode(llm, prompts: list[list[int]], new: int, repeats: int) -> float:
    """Aggregate greedy decode tok/s of llama.cpp decoding ``prompts`` together: one ``llama_decode`` of every
    prompt, then of one token per sequence per step (its llama-batched example's loop), in a context of its own
    with a sequence per prompt. Timed as lucidlm's ``measure``: (new − 1) steps past the first token."""
    import time

    import llama_cpp
    import numpy as np

    n, p = len(prompts), len(prompts[0])
    params = llama_cpp.llama_context_default_params()
    per_sequence = -(-(p + new + 8) // 256) * 256  # llama.cpp splits the context evenly between sequences
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n * per_sequence, n * p, n * p, n
    params.n_threads = params.n_threads_batch = torch.get_num_threads()
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(n * p, 0, 1)
    vocab = llm.n_vocab()

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def run(steps: int) -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        decode([(t, j, s, j == p - 1) for s, ids in enumerate(prompts) for j, t in enumerate(ids)])
        last = [s * p + p - 1 for s in range(n)]
        for step in range(steps - 1):
            nxt = [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())
                   for i in last]
            decode([(t, p + step, s, True) for s, t in enumerate(nxt)])
            last = list(range(n))
        return time.perf_counter() - start

    try:
        run(2)  # warm-up
        t1 = sorted(run(1) for _ in range(repeats))[repeats // 2]
        tn = sorted(run(new) for _ in range(repeats))[repeats // 2]
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return n * (new - 1) / (tn - t1)


def run_quant_bench(model: str | Path = "smollm2-135m-instruct", prompt: int = 64, new: int = 64, repeats: int = 3,
                    print_fn: Callable[[str], None] = print, way: str = "default", llamacpp: bool = False,
                    demo: Path | None = None) -> tuple[list[QuantRow], float]:
    """model: a checkpoint, a named model or RANDOM_125M. way: the decode path timed ("default": compiled steps;
    the tests use "eager"). llamacpp: add llama.cpp's row on the same file (checked before anything is measured).
    demo: a finished demo of this model, whose probe is measured per format."""
    if str(model) == RANDOM_125M:  # the random Llama-shaped 125M of `lucidlm bench`: speed only (no tokenizer)
        if llamacpp or demo is not None:
            raise ValueError(f"{RANDOM_125M} has no GGUF file nor demo: --llamacpp and --demo need a real model")
        from .bench_probe import random_125m_lm

        with tempfile.TemporaryDirectory() as tmp:
            random_125m_lm(Path(tmp) / "model", "float32")
            return _measure_formats(Path(tmp) / "model", prompt, new, repeats, print_fn, way, None, None)
    llamacpp_at = llamacpp_file(model) if llamacpp else None  # before anything is measured
    held_out = demo_probe(demo) if demo is not None else None
    return _measure_formats(model, prompt, new, repeats, print_fn, way, llamacpp_at, held_out)


def _measure_formats(model: str | Path, prompt: int, new: int, repeats: int, print_fn: Callable[[str], None],
                     way: str, llamacpp_at: Path | None, held_out) -> tuple[list[QuantRow], float]:
    from ..api import load

    bandwidth = read_bandwidth()
    text = reference_text()
    loaded = [(label, load(model, **options)) for label, options in formats(Path(model))]
    has_text = loaded[0][1].tokenizer is not None  # a random checkpoint has none: no quality columns
    reference = greedy(dict(loaded)["bfloat16"]) if has_text else None
    rows = []
    vocab = loaded[0][1].config.vocab_size
    ids8 = torch.randint(0, vocab, (8, prompt), generator=torch.Generator().manual_seed(1))  # llama.cpp's too
    for label, lm in loaded:
        # a prompt of ``prompt`` tokens (llama.cpp's too): the text's, or the batch's first without a tokenizer
        ids1 = torch.tensor([lm.encode(text)[:prompt]]) if has_text else ids8[:1]
        prefill, decode_1, _ = measure(_ours_runner(lm, ids1, way), 1, ids1.shape[1], new, repeats)
        _, decode_8, _ = measure(_ours_runner(lm, ids8, way), 8, prompt, new, repeats)
        bound = bandwidth / decode_bytes(lm.model, 1, prompt + new // 2)
        nan = float("nan")
        rows.append(QuantRow(label, decode_weight_bytes(lm.model), decode_1, decode_8, prefill, bound,
                             perplexity(lm, text) if has_text else nan,
                             agreement(greedy(lm), reference) if has_text else nan,
                             None if held_out is None else probe_auroc(lm, *held_out)))
        print_fn(f"done: {label}")
    if llamacpp_at is not None:
        rows.append(llamacpp_row(llamacpp_at, prompt, new, repeats, bandwidth, ids8.tolist()))
        print_fn("done: llama.cpp")
    return rows, bandwidth


def demo_probe(demo: Path):
    """(probe head, its config, the demo's test answers) of a finished demo directory (else a named error)."""
    from ..probe.probe import load_probe
    from .demo import held_out

    directory, test_rows = held_out(Path(demo))
    head, config = load_probe(directory)
    return head, config, test_rows


def probe_auroc(lm, head, config, test_rows: list[dict]) -> dict:
    from ..probe.benchmark import held_out_auroc
    from ..tokenizer import pad_id

    if config.hidden_size != lm.config.dim:
        raise ValueError(f"the demo's probe reads {config.hidden_size}-wide states; this model's are {lm.config.dim}")
    with torch.inference_mode():
        return held_out_auroc(lm.model, lm.tokenizer, head, config, test_rows, pad_id(lm.tokenizer))


def llamacpp_file(model: str | Path) -> Path:
    """The GGUF file llama.cpp will run, once llama-cpp-python is known to be installed (else a named error)."""
    from ..checkpoint.gguf import find_gguf
    from ..checkpoint.local_models import resolve_model_path

    file = find_gguf(resolve_model_path(model))
    if file is None:
        raise ValueError(f"--llamacpp runs llama.cpp on a GGUF file; {model} is not one")
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError(f"--llamacpp needs llama-cpp-python: {LLAMACPP_INSTALL}")
    return file


def quant_table(rows: list[QuantRow], bandwidth: float, model: str) -> str:
    base = next(r for r in rows if r.label == "bfloat16")
    lines = [f"Quantized weights on {model} (one run; decode and prefill with the default path, compiled steps)", "",
             "| format | weights read per token MB | decode tok/s b1 | % of bound | decode tok/s b8 | prefill tok/s "
             "| perplexity | Δ vs bf16 | greedy agreement with bf16 | probe AUROC [95% CI] | NLL AUROC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(x: float, spec: str, unit: str = "") -> str:
        return "—" if math.isnan(x) else format(x, spec) + unit

    for r in rows:
        lines.append(f"| {r.label} | {r.weight_bytes / 1e6:.0f} | {cell(r.decode_1, '.1f')} "
                     f"| {cell(100 * r.decode_1 / r.bound_1, '.0f', '%')} | {cell(r.decode_8, '.1f')} "
                     f"| {r.prefill:.0f} "
                     f"| {cell(r.perplexity, '.3f')} | {cell(100 * (r.perplexity / base.perplexity - 1), '+.2f', '%')} "
                     f"| {cell(100 * r.agreement, '.1f', '%')} | {auroc_cell(r.probe, 'probe')} "
                     f"| {auroc_cell(r.probe, 'nll')} |")
    lines += ["", f"bound = measured read bandwidth ({bandwidth / 1e9:.1f} GB/s) ÷ the bytes a batch-1 decode step "
              "reads (weights and scales, the KV cache at mid-generation). Perplexity: CPython's LICENSE, "
              f"{PERPLEXITY_TOKENS} tokens in windows of {PERPLEXITY_WINDOW}. Greedy agreement: {AGREEMENT_TOKENS} "
              f"tokens × {len(PROMPTS)} prompts, position by position."]
    probed = next((r.probe for r in rows if r.probe), None)
    lines.append(f"Probe: the main job's probe on its {probed['probe']['n']} held-out greedy claims "
                 f"({probed['probe']['positives']} not supported), read from each format's states; AUROC 95% CI over "
                 "entities." if probed else "Probe: — (no finished demo: run `lucidlm demo`, then --demo runs/demo).")
    return "\n".join(lines)


def auroc_cell(probe: dict | None, method: str) -> str:
    if not probe:
        return "—"
    a = probe[method]
    return f"{a['auroc']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]" if method == "probe" else f"{a['auroc']:.3f}"

