"""``lucidlm bench --probe``: what scoring every token costs while streaming.

The same random Llama-shaped 125M model streams ``new`` tokens at batch 1, without a probe and with a
probe on its middle block (the hook hands out that block's hidden state, the head is one dot product
per token). Runs alternate, so drift in the machine's speed hits both alike; the decode step time is
the median over runs of (time of ``new`` tokens − time of 1 token) ÷ (new − 1). The overhead is the
relative difference of the two step times; because the machines are noisy (run-to-run spread is
printed), the probe's own per-step work (head + the score handed to Python) is also timed directly
and given as a share of the step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from ..probe.probe import LoadedProbe, ProbeConfig, ProbeHead
from .bench import LLAMA_125M


def random_125m_lm(directory: Path, dtype: str):
    """The random-weight Llama-shaped 125M of `lucidlm bench`, saved in ``directory`` and loaded on the CPU."""
    import lucidlm
    from lucidlm.checkpoint import FAMILIES, save_model
    from lucidlm.config import from_preset

    cfg = from_preset("llama-125m", vocab_size=LLAMA_125M["vocab_size"])
    torch.manual_seed(0)
    model = lucidlm.Transformer(cfg)
    model.init_weights()
    save_model(model, directory, FAMILIES["llama"])
    return lucidlm.load(directory, dtype=dtype, device="cpu")


def _stream_seconds(lm, prompt: list[int], new: int) -> float:
    start = time.perf_counter()
    deque(lm.stream(prompt, max_new_tokens=new, ignore_eos=True), maxlen=0)  # drain the stream
    return time.perf_counter() - start


def _head_seconds(head: ProbeHead, dim: int, dtype: torch.dtype, calls: int = 2000) -> float:
    """The probe's own work per decode step, timed directly (median of batches of calls): the head on
    one hidden state and the score handed to Python — what the engine's ProbeScoring does (generate/engine.py)."""
    hidden = torch.randn(1, dim, dtype=dtype)
    times = []
    with torch.no_grad():
        for _ in range(9):
            start = time.perf_counter()
            for _ in range(calls // 10):
                head.scores(hidden).tolist()
            times.append((time.perf_counter() - start) / (calls // 10))
    return statistics.median(times)


def run_probe_bench(prompt: int = 64, new: int = 64, repeats: int = 7, dtype: str = "float32") -> dict:
    """{"step_ms_plain", "step_ms_probe", "overhead_percent", "layer", "repeats"}: medians over alternating runs."""
    with tempfile.TemporaryDirectory() as tmp:
        lm = random_125m_lm(Path(tmp), dtype)
    layer = lm.config.n_layers // 2
    probe = LoadedProbe(ProbeHead(lm.config.dim).to(lm.dtype).eval(), ProbeConfig(layer, lm.config.dim,
                                                                                 lm.config.n_layers))
    ids = torch.randint(0, lm.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    steps: dict[str, list[float]] = {"plain": [], "probe": []}
    for r in range(repeats + 1):
        for name in ("plain", "probe") if r % 2 == 0 else ("probe", "plain"):
            lm.probe = probe if name == "probe" else None
            one, full = _stream_seconds(lm, ids, 1), _stream_seconds(lm, ids, new)
            if r > 0:  # the first round warms up (and builds the compiled steps)
                steps[name].append((full - one) / (new - 1))
    plain, probed = statistics.median(steps["plain"]), statistics.median(steps["probe"])
    head_s = _head_seconds(probe.head, lm.config.dim, lm.dtype)
    return {"head_us": 1e6 * head_s, "head_percent": 100 * head_s / plain,
            "step_ms_plain": 1000 * plain, "step_ms_probe": 1000 * probed,
            "overhead_percent": 100 * (probed - plain) / plain, "layer": layer, "repeats": repeats,
            "spread_percent": 100 * (max(steps["plain"]) - min(steps["plain"])) / plain,
            "dtype": dtype, "new_tokens": new}


def probe_table(result: dict) -> str:
    return ("| streaming, 125M float32 batch 1 | decode step ms (median) |\n|---|---|\n"
            f"| without a probe | {result['step_ms_plain']:.2f} |\n"
            f"| with a probe on block {result['layer']} | {result['step_ms_probe']:.2f} |\n"
            f"| probe overhead, end to end | {result['overhead_percent']:+.2f}% |\n"
            f"| **probe overhead, its own work timed directly** | **{result['head_us']:.1f} µs = "
            f"{result['head_percent']:.2f}%** |\n\n"
            f"{result['repeats']} alternating runs of {result['new_tokens']} tokens; run-to-run spread of the "
            f"step without a probe: {result['spread_percent']:.1f}% (an end-to-end difference below it is noise). "
            f"The probe's own work — one {LLAMA_125M['hidden_size']}-wide dot product and a sigmoid per token, "
            "on a hidden state the forward hands out without a copy — is timed directly as well.")
