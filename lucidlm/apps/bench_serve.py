"""``lucidlm bench --serve``: what continuous batching, chunked prefill and prefix caching buy, measured over HTTP
in one run.

A ``lucidlm serve`` process runs the model (a separate process, so the clients' own Python work does not
compete with the server for its interpreter lock). Three scenarios, each selectable:

- levels: for 1, 8 and 32 concurrent clients, each client streams its requests one after another through
  ``/v1/completions``. Per level: aggregate generated tokens/s over the level's wall time, time to first token
  (request sent -> first token chunk) and inter-token latency (gaps between a stream's token chunks), p50 and
  p95 over every request. The physical reference is the memory-bandwidth bound of the decode step at that batch
  size: measured read bandwidth × batch ÷ bytes one step must read (weights + the KV cache), as in
  ``lucidlm bench``. The library's own decode step (``lm.stream`` of the same model, default ``lucidlm.load``,
  measured in this process before the server starts) is the reference of the 1-client inter-token latency.
- long prompt: 32 streaming clients; once all of them decode, one request with a 2,000-token prompt arrives.
  The streams' inter-token gaps while it is prefilled (request sent -> its first token) are compared with their
  gaps before it arrived: chunked prefill bounds the stall to one chunk per decode step.
- shared prefix: request A (a 500-token head + a short tail), then request B (the same head + another tail):
  B's time to first token against A's, and the prompt tokens the server's prefix cache saved.

The table lists the serving targets (one engine loop, docs/ARCHITECTURE.md) beside the measured values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bench import decode_bytes, read_bandwidth

MODEL = "bench"
SCENARIOS = ("levels", "long-prompt", "shared-prefix")
SETTLE_TOKENS = 8  # long prompt: every stream has this many tokens before the long request is sent
SHORT_NEW = 4  # tokens asked by the long request and by the shared-prefix requests (their first token matters)
PREFIX_TAIL = 16  # tokens after the shared head
TARGET_SPEEDUP = {8: 4.0, 32: 8.0}  # aggregate tok/s at that many clients ≥ this × one client
TARGET_ITL_VS_LIBRARY = 1.10  # 1 client: ITL p50 ≤ 1.1 × the library's decode step
TARGET_LONG_STALL = 2.0  # ITL p95 while a long prompt is prefilled ≤ 2 × the ITL p50 before it
TARGET_PREFIX_TTFT = 1 / 3  # TTFT of the 2nd request sharing a head ≤ ⅓ of the first's


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

    def add(self, sent: float, times: list[float]) -> None:
        """One finished request: sent at ``sent``, its token chunks received at ``times``."""
        self.requests += 1
        self.tokens += len(times)
        self.ttft_s.append(times[0] - sent)
        self.itl_s.extend(np.diff(times).tolist())


@dataclass
class LongPrompt:
    streams: int
    prompt_tokens: int  # of the long request
    before_itl_s: list[float]  # the streams' gaps once all decode, before the long request is sent
    window_itl_s: list[float]  # their gaps overlapping its prefill (sent -> its first token)
    ttft_s: float  # of the long request: the window's length

    @property
    def stall(self) -> float:
        return _pct(self.window_itl_s, 95) / _pct(self.before_itl_s, 50)


@dataclass
class SharedPrefix:
    head: int
    tail: int
    ttft_a_s: float
    ttft_b_s: float
    tokens_saved: int  # prefix_tokens_saved of the server's batcher, over request B

    @property
    def ratio(self) -> float:
        return self.ttft_b_s / self.ttft_a_s


@dataclass
class ServeBench:
    prompt: int
    new: int
    levels: list[Level] = field(default_factory=list)
    library_step_s: float | None = None  # lm.stream's decode step, same model, same run
    long: LongPrompt | None = None
    prefix: SharedPrefix | None = None


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


# --- the client side --------------------------------------------------------------------------------------------
def _client(url: str, connections: int):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=connections + 4))


async def _stream(http, prompt: list[int], new: int, times: list[float]) -> float:
    """Stream one completion; append each token chunk's arrival time to ``times`` as it comes. Returns the time
    the request was sent."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True}
    sent = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"][0]["finish_reason"] is None:  # the closing chunk carries no token
                times.append(time.perf_counter())
    return sent


async def _health(http) -> dict:
    return (await http.get("/health")).json()


async def _wait_idle(http, timeout: float = 120.0) -> None:
    """Until the server runs, prefills and queues nothing (cancelled streams are dropped between steps)."""
    deadline = time.perf_counter() + timeout
    while True:
        h = await _health(http)
        if h["running"] == h["prefilling"] == h["waiting"] == 0:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the server is still busy after {timeout:.0f} s: {h}")
        await asyncio.sleep(0.02)


def _random_prompt(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


# --- the scenarios ----------------------------------------------------------------------------------------------
async def _run_level(url: str, clients: int, requests_per_client: int, prompt_len: int, new: int,
                     vocab: int, seed: int = 0) -> Level:
    level = Level(clients)
    rng = np.random.default_rng([seed, clients])

    async def client() -> None:
        for _ in range(requests_per_client):
            times: list[float] = []
            sent = await _stream(http, _random_prompt(rng, vocab, prompt_len), new, times)
            level.add(sent, times)

    async with _client(url, clients) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        level.wall_s = time.perf_counter() - start
    return level


async def _run_long_prompt(url: str, streams: int, prompt_len: int, long_len: int, max_len: int,
                           vocab: int) -> LongPrompt:
    """``streams`` clients decode; once each has SETTLE_TOKENS tokens, one ``long_len``-token prompt arrives.
    The streams ask for as many tokens as their context holds and are closed once the long request is done."""
    rng = np.random.default_rng(15)
    times: list[list[float]] = [[] for _ in range(streams)]
    async with _client(url, streams + 1) as http:
        tasks = [asyncio.create_task(_stream(http, _random_prompt(rng, vocab, prompt_len), max_len - prompt_len, t))
                 for t in times]
        while min(len(t) for t in times) < SETTLE_TOKENS:
            for task in tasks:
                if task.done():
                    task.result()  # a failed stream raises here; one that ended early is a bug of the sizes
                    raise RuntimeError("a stream ended before the long prompt arrived")
            await asyncio.sleep(0.002)
        decoding = max(t[0] for t in times)  # from here every stream decodes
        long_times: list[float] = []
        sent = await _stream(http, _random_prompt(rng, vocab, long_len), SHORT_NEW, long_times)
        first = long_times[0]
        for task in tasks:
            task.cancel()  # closing the connection cancels the sequence on the server
        await asyncio.gather(*tasks, return_exceptions=True)
        await _wait_idle(http)
    gaps = [(a, b) for t in times for a, b in zip(t, t[1:])]
    return LongPrompt(streams, long_len, before_itl_s=[b - a for a, b in gaps if a >= decoding and b <= sent],
                      window_itl_s=[b - a for a, b in gaps if b > sent and a < first], ttft_s=first - sent)


async def _run_shared_prefix(url: str, head: int, vocab: int) -> SharedPrefix:
    """A then B, one after another on an idle server: the same ``head`` tokens, different tails."""
    rng = np.random.default_rng(500)
    shared = _random_prompt(rng, vocab, head)
    ttft, saved = [], []
    async with _client(url, 1) as http:
        await _wait_idle(http)
        for _ in range(2):
            before = (await _health(http))["prefix_tokens_saved"]
            times: list[float] = []
            sent = await _stream(http, shared + _random_prompt(rng, vocab, PREFIX_TAIL), SHORT_NEW, times)
            ttft.append(times[0] - sent)
            saved.append((await _health(http))["prefix_tokens_saved"] - before)
    return SharedPrefix(head, PREFIX_TAIL, ttft[0], ttft[1], saved[1])


def _library_step(lm, prompt_len: int, new: int, repeats: int = 3) -> float:
    """Seconds per decode step of ``lm.stream`` (the library's default path) at batch 1: median over runs of
    (time of ``new`` tokens − time of 1 token) ÷ (new − 1)."""
    from .bench_probe import _stream_seconds

    ids = _random_prompt(np.random.default_rng(1), lm.config.vocab_size, prompt_len)
    _stream_seconds(lm, ids, new)  # warm-up: builds its compiled decode steps
    return statistics.median((_stream_seconds(lm, ids, new) - _stream_seconds(lm, ids, 1)) / (new - 1)
                             for _ in range(repeats))


def run_serve_bench(model: Path | None = None, clients: tuple[int, ...] = (1, 8, 32), requests_per_client: int = 2,
                    prompt: int = 64, new: int = 64, dtype: str = "float32", print_fn=print,
                    start_timeout: float = 120.0, scenarios: tuple[str, ...] = SCENARIOS, long_prompt: int = 2000,
                    long_clients: int = 32, shared_prefix: int = 500) -> ServeBench:
    """Serve ``model`` (default: a random Llama-shaped 125M) and run ``scenarios`` (of SCENARIOS); the server
    process must answer /health within ``start_timeout`` seconds."""
    from ..api import load

    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or new < 2:
        raise ValueError(f"unknown scenarios {sorted(unknown)} (known: {', '.join(SCENARIOS)})" if unknown
                         else f"new must be >= 2 (a decode step needs two tokens), got {new}")
    bench = ServeBench(prompt, new)
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from .bench_probe import random_125m_lm

            model = Path(tmp) / "model"
            lm = random_125m_lm(model, dtype)
        else:
            lm = load(model, dtype=dtype, device="cpu")
        context = lm.config.max_seq_len
        needs = [prompt + new] if "levels" in scenarios else []
        if "long-prompt" in scenarios:
            needs.append(long_prompt + SHORT_NEW)
        if "shared-prefix" in scenarios:
            needs.append(shared_prefix + PREFIX_TAIL + SHORT_NEW)
        if max(needs, default=0) > context:
            raise ValueError(f"the scenarios need {max(needs)} tokens of context; the model has {context}")
        max_len = min(context, max(needs, default=prompt + new) + 8)
        max_batch = max([*clients, long_clients + 1] if "long-prompt" in scenarios else clients)
        vocab = lm.config.vocab_size
        if "levels" in scenarios:
            print_fn(f"measuring read bandwidth and the library's decode step of "
                     f"{lm.model.num_parameters() / 1e6:.0f}M params ...")
            bandwidth = read_bandwidth()
            bytes_per_step = {c: decode_bytes(lm.model, c, prompt + new // 2) for c in clients}
            bench.library_step_s = _library_step(lm, prompt, new)
        del lm  # the server process loads its own copy
        with _server_process(model, max_batch, max_len, dtype, start_timeout, Path(tmp) / "server.log") as url:
            asyncio.run(_run_level(url, 1, 1, prompt, min(new, 8), vocab, seed=1))  # warm-up: first-call costs
            for c in clients if "levels" in scenarios else ():
                asyncio.run(_run_level(url, c, 1, prompt, new, vocab, seed=2))  # builds its step shapes
                level = asyncio.run(_run_level(url, c, requests_per_client, prompt, new, vocab))
                level.bound_tok_s = c * bandwidth / bytes_per_step[c]
                print_fn(f"{c:>3} clients: {level.tok_s:8.1f} tok/s")
                bench.levels.append(level)
            if "long-prompt" in scenarios:
                bench.long = asyncio.run(_run_long_prompt(url, long_clients, prompt, long_prompt, max_len, vocab))
                print_fn(f"long prompt: ITL p95 while prefilled ÷ p50 before = {bench.long.stall:.2f}")
            if "shared-prefix" in scenarios:
                bench.prefix = asyncio.run(_run_shared_prefix(url, shared_prefix, vocab))
                print_fn(f"shared prefix: TTFT B ÷ A = {bench.prefix.ratio:.2f}")
    return bench


@contextlib.contextmanager
def _server_process(model: Path, max_batch: int, max_len: int, dtype: str, start_timeout: float, log: Path):
    """``lucidlm serve`` on a free local port (its stderr to ``log``), stopped (SIGINT, drained) on exit."""
    from ..serve.server import free_port, wait_until_healthy

    port = free_port()
    cmd = [sys.executable, "-m", "lucidlm", "serve", "-m", str(model), "--port", str(port), "--device", "cpu",
           "--dtype", dtype, "--served-model-name", MODEL, "--max-batch", str(max_batch), "--max-queue",
           str(4 * max_batch), "--max-model-len", str(max_len), "--log-level", "warning"]
    with open(log, "w") as err:  # a file, not a pipe: a pipe nobody reads would block the server once full
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, proc, start_timeout)
        except RuntimeError as e:
            raise RuntimeError(f"lucidlm serve did not start: {e}\n{log.read_text()}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- the table --------------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if math.isfinite(x) else "-"


def _mark(value: float, target: float, at_most: bool) -> str:
    if not math.isfinite(value):
        return "-"
    return "PASS" if (value <= target if at_most else value >= target) else "**MISS**"


def _levels_table(bench: ServeBench) -> list[str]:
    base = bench.levels[0].tok_s
    lines = ["| clients | requests | tokens | wall s | aggregate tok/s | × 1 client | TTFT p50 ms | TTFT p95 ms "
             "| ITL p50 ms | ITL p95 ms | bound tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in bench.levels:
        lines.append(f"| {lv.clients} | {lv.requests} | {lv.tokens} | {lv.wall_s:.1f} | {lv.tok_s:.1f} | "
                     f"{lv.tok_s / base:.2f} | {_ms(_pct(lv.ttft_s, 50))} | {_ms(_pct(lv.ttft_s, 95))} | "
                     f"{_ms(_pct(lv.itl_s, 50))} | {_ms(_pct(lv.itl_s, 95))} | {lv.bound_tok_s:.0f} |")
    lines.append(f"\nEach client streams its requests one after another ({bench.prompt}-token prompts, {bench.new} "
                 "tokens each, greedy, ignore_eos) through /v1/completions on one server; bound = measured read "
                 "bandwidth × clients ÷ bytes a decode step at that batch reads (weights + KV cache).")
    return lines


def _target_rows(bench: ServeBench) -> list[tuple[str, float, str, str]]:
    """(what, measured, target, mark) for every target the run measured."""
    rows = []
    one = next((lv for lv in bench.levels if lv.clients == 1), None)
    if one is not None and bench.library_step_s:
        itl = _pct(one.itl_s, 50)
        rows.append((f"1 client: ITL p50 ({_ms(itl)} ms) ÷ library decode step, `lm.stream` "
                     f"({bench.library_step_s * 1e3:.1f} ms)", itl / bench.library_step_s,
                     f"≤ {TARGET_ITL_VS_LIBRARY:.2f}", _mark(itl / bench.library_step_s, TARGET_ITL_VS_LIBRARY, True)))
    for lv in bench.levels:
        if one is not None and lv.clients in TARGET_SPEEDUP:
            x, target = lv.tok_s / one.tok_s, TARGET_SPEEDUP[lv.clients]
            rows.append((f"{lv.clients} clients: aggregate tok/s ÷ 1 client", x, f"≥ {target:.0f}",
                         _mark(x, target, False)))
    if bench.long is not None:
        lp = bench.long
        rows.append((f"{lp.streams} streams + one {lp.prompt_tokens}-token prompt: ITL p95 while it is prefilled "
                     f"({_ms(_pct(lp.window_itl_s, 95))} ms) ÷ ITL p50 before ({_ms(_pct(lp.before_itl_s, 50))} ms)",
                     lp.stall, f"≤ {TARGET_LONG_STALL:.0f}", _mark(lp.stall, TARGET_LONG_STALL, True)))
    if bench.prefix is not None:
        sp = bench.prefix
        rows.append((f"2nd request sharing a {sp.head}-token head: TTFT B ({_ms(sp.ttft_b_s)} ms) ÷ A "
                     f"({_ms(sp.ttft_a_s)} ms); {sp.tokens_saved} prompt tokens from the prefix cache", sp.ratio,
                     "≤ 0.33", _mark(sp.ratio, TARGET_PREFIX_TTFT, True)))
    return rows


def _scenario_tables(bench: ServeBench) -> list[str]:
    lines = []
    if bench.long is not None:
        lp = bench.long
        lines += ["| streams | long prompt tokens | its TTFT ms | ITL p50 before ms | ITL p95 before ms "
                  "| ITL p50 while prefilled ms | ITL p95 while prefilled ms | p95 while ÷ p50 before |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {lp.streams} | {lp.prompt_tokens} | {_ms(lp.ttft_s)} | {_ms(_pct(lp.before_itl_s, 50))} | "
                  f"{_ms(_pct(lp.before_itl_s, 95))} | {_ms(_pct(lp.window_itl_s, 50))} | "
                  f"{_ms(_pct(lp.window_itl_s, 95))} | {lp.stall:.2f} |",
                  f"\nLong prompt: {lp.streams} clients stream ({bench.prompt}-token prompts); once each has "
                  f"{SETTLE_TOKENS} tokens, one {lp.prompt_tokens}-token prompt arrives. \"Before\": the streams' "
                  "token gaps from when all decode until it is sent; \"while prefilled\": their gaps overlapping "
                  "the time from its request to its first token.", ""]
    if bench.prefix is not None:
        sp = bench.prefix
        lines += ["| shared head tokens | tail tokens | TTFT A ms | TTFT B ms | B ÷ A | prefix tokens saved |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {sp.head} | {sp.tail} | {_ms(sp.ttft_a_s)} | {_ms(sp.ttft_b_s)} | {sp.ratio:.2f} | "
                  f"{sp.tokens_saved} |",
                  f"\nShared prefix: request A ({sp.head}-token head + {sp.tail}-token tail), then B (same head, "
                  "another tail), alone on the server; prefix tokens saved: the batcher's prefix_tokens_saved over "
                  "B (the cache keeps whole 64-token blocks).", ""]
    return lines


def serve_table(bench: ServeBench) -> str:
    """Markdown: the levels, the long-prompt and shared-prefix scenarios, then the serving targets beside the
    measured values."""
    lines = _levels_table(bench) + [""] if bench.levels else []
    lines += _scenario_tables(bench)
    targets = _target_rows(bench)
    if targets:
        lines += ["| target | measured | goal | |", "|---|---:|---:|---|"]
        lines += [f"| {what} | {x:.2f} | {goal} | {mark} |" for what, x, goal, mark in targets]
    return "\n".join(lines).rstrip()
