"""``lucidlm bench --serve``: what continuous batching buys, measured over HTTP in one run.

A ``lucidlm serve`` process runs the model (a separate process, so the clients' own Python work does not
compete with the server for its interpreter lock); for 1, 8 and 32 concurrent clients, each client
streams its requests one after another through ``/v1/completions``. Per level: aggregate
generated tokens/s over the level's wall time, time to first token (request sent -> first token chunk)
and inter-token latency (gaps between a stream's token chunks), p50 and p95 over every request. The
physical reference is the memory-bandwidth bound of the decode step at that batch size: measured read
bandwidth × batch ÷ bytes one step must read (weights + the KV cache), as in ``lucidlm bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bench import decode_bytes, read_bandwidth

MODEL = "bench"


@dataclass
class Level:
    clients: int
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    bound_tok_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


async def _one_request(http, prompt: list[int], new: int, level: Level) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True}
    sent = time.perf_counter()
    last = None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"][0]["finish_reason"] is not None:
                continue  # the closing chunk carries no token
            now = time.perf_counter()
            if last is None:
                level.ttft_s.append(now - sent)
            else:
                level.itl_s.append(now - last)
            last = now
            level.tokens += 1
    level.requests += 1


async def _run_level(url: str, clients: int, requests_per_client: int, prompt_len: int, new: int,
                     vocab: int) -> Level:
    import httpx

    level = Level(clients)
    rng = np.random.default_rng(clients)

    async def client(i: int) -> None:
        for _ in range(requests_per_client):
            prompt = rng.integers(0, vocab, prompt_len).tolist()
            await _one_request(http, prompt, new, level)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        level.wall_s = time.perf_counter() - start
    return level


def run_serve_bench(model: Path | None = None, clients: tuple[int, ...] = (1, 8, 32), requests_per_client: int = 2,
                    prompt: int = 64, new: int = 64, dtype: str = "float32", print_fn=print,
                    start_timeout: float = 120.0) -> list[Level]:
    """Serve ``model`` (default: a random Llama-shaped 125M) and measure every concurrency level; the server
    process must answer /health within ``start_timeout`` seconds."""
    from ..api import load

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from .bench_probe import random_125m_lm

            model = Path(tmp) / "model"
            lm = random_125m_lm(model, dtype)
        else:
            lm = load(model, dtype=dtype, device="cpu")
        print_fn(f"measuring read bandwidth, then serving {lm.model.num_parameters() / 1e6:.0f}M params ...")
        bandwidth = read_bandwidth()
        bytes_per_step = {c: decode_bytes(lm.model, c, prompt + new // 2) for c in clients}
        vocab = lm.config.vocab_size
        del lm  # the server process loads its own copy
        with _server_process(model, max(clients), prompt + new + 8, dtype, start_timeout) as url:
            asyncio.run(_run_level(url, 1, 1, prompt, new, vocab))  # warm-up: first-call costs
            levels = []
            for c in clients:
                level = asyncio.run(_run_level(url, c, requests_per_client, prompt, new, vocab))
                level.bound_tok_s = c * bandwidth / bytes_per_step[c]
                print_fn(f"{c:>3} clients: {level.tok_s:8.1f} tok/s")
                levels.append(level)
    return levels


@contextlib.contextmanager
def _server_process(model: Path, max_batch: int, max_len: int, dtype: str, start_timeout: float):
    """``lucidlm serve`` on a free local port, stopped (SIGINT, drained) on exit."""
    from ..serve.server import free_port, wait_until_healthy

    port = free_port()
    cmd = [sys.executable, "-m", "lucidlm", "serve", "-m", str(model), "--port", str(port), "--device", "cpu",
           "--dtype", dtype, "--served-model-name", MODEL, "--max-batch", str(max_batch), "--max-queue",
           str(4 * max_batch), "--max-model-len", str(max_len), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, proc, start_timeout)
        except RuntimeError as e:
            said = proc.stderr.read() if proc.poll() is not None else ""
            raise RuntimeError(f"lucidlm serve did not start: {e}\n{said}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_table(levels: list[Level], prompt: int, new: int) -> str:
    base = levels[0].tok_s
    ms = lambda xs, q: f"{np.percentile(xs, q) * 1e3:.0f}" if xs else "-"  # noqa: E731
    lines = ["| clients | requests | tokens | wall s | aggregate tok/s | × 1 client | TTFT p50 ms | TTFT p95 ms "
             "| ITL p50 ms | ITL p95 ms | bound tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        lines.append(f"| {lv.clients} | {lv.requests} | {lv.tokens} | {lv.wall_s:.1f} | {lv.tok_s:.1f} | "
                     f"{lv.tok_s / base:.2f} | {ms(lv.ttft_s, 50)} | {ms(lv.ttft_s, 95)} | {ms(lv.itl_s, 50)} | "
                     f"{ms(lv.itl_s, 95)} | {lv.bound_tok_s:.0f} |")
    lines.append(f"\nEach client streams its requests one after another ({prompt}-token prompts, {new} tokens each, "
                 "greedy, ignore_eos) through /v1/completions on one server; bound = measured read bandwidth × "
                 "clients ÷ bytes a decode step at that batch reads (weights + KV cache).")
    return "\n".join(lines)
