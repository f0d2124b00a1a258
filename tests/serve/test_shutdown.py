"""Graceful shutdown of a real `lucidlm serve` process: on SIGINT or SIGTERM, streams in flight that can finish within
--drain-timeout finish; the others end cleanly with finish_reason "abort" and [DONE]; the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from waiting import HANG_GUARD

from lucidlm.random_checkpoint import build_random_checkpoint
from lucidlm.serve.server import free_port, wait_until_healthy

LONG = 4000


def read_stream(url: str, max_tokens: int, started: threading.Event, out: dict, started_at: int = 1) -> None:
    """Stream a completion into ``out``; ``started`` is set once ``started_at`` tokens have arrived (or it ended)."""
    body = {"model": "ck", "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=HANG_GUARD) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    break
                choice = json.loads(line[6:])["choices"][0]
                out["tokens"] = out.get("tokens", 0) + (choice["finish_reason"] is None)
                out["finish"] = choice["finish_reason"] or out.get("finish")
                if out["tokens"] >= started_at:
                    started.set()
    finally:
        started.set()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_short_streams_and_cleanly_ends_long_ones(tmp_path, sig):
    # the long stream asks for 4000 tokens, many times what the 1.5 s of draining can decode even on a fast machine (a
    # 480-token one finished within them on CI's), so the deadline is what ends it
    build_random_checkpoint(tmp_path / "ck", max_seq_len=4096)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lucidlm", "serve", "-m", str(tmp_path / "ck"), "--port",
                             str(port), "--drain-timeout", "1.5", "--log-level", "warning", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(url, proc, timeout=HANG_GUARD)
        short, long = {}, {}
        events = [threading.Event(), threading.Event()]
        # the short stream is one token from its end when the signal comes, however slow the machine: it finishes
        # within the 1.5 s of draining
        threads = [threading.Thread(target=read_stream, args=(url, 6, events[0], short, 5)),
                   threading.Thread(target=read_stream, args=(url, LONG, events[1], long))]
        for t in threads:
            t.start()
        assert all(e.wait(HANG_GUARD) for e in events)
        proc.send_signal(sig)
        for t in threads:
            t.join(HANG_GUARD)
        assert short == {"tokens": 6, "finish": "length", "done": True}
        assert long["finish"] == "abort" and long["done"] and long["tokens"] < LONG
        assert proc.wait(HANG_GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_model_directory_or_port_before_listening(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "lucidlm", "serve", "-m", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=HANG_GUARD)
    assert bad.returncode != 0 and "missing" in bad.stderr and "Uvicorn running" not in bad.stderr
    port = subprocess.run([sys.executable, "-m", "lucidlm", "serve", "-m", str(tmp_path), "--port", "70000"],
                          capture_output=True, text=True, timeout=HANG_GUARD)
    assert port.returncode == 2 and "port" in port.stderr
