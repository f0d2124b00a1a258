"""The server under attack (issue 14): one client's poisonous request never ends another client's stream, every
bad input is a 4xx naming the problem (never a 500 or a dropped connection), the event loop never stalls on one
request's CPU work, and slow, oversized or half-open clients are cut off."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time

import httpx
import pytest
import torch
from live_server import MODEL, LiveServer
from tiny_lm import tiny_lm
from waiting import HANG_GUARD, async_wait_for, wait_for

from lucidlm.generate.generation_config import GenerationConfig
from lucidlm.generate.prefill import Prefill
from lucidlm.generate.sampling import SamplingParams
from lucidlm.serve.batcher import ErrorEvent, Sequence

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(lm):
    s = LiveServer(lm, max_batch=24, max_queue=8, max_len=256, max_prompts=16)
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=HANG_GUARD) as client:
        yield client


def error_of(r: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]  # the body is always valid JSON, even when the input was not valid Unicode
    assert error["param"] == param, error
    assert all(w in error["message"] for w in words), error
    return error


# --- item 1: poisonous sampling options -------------------------------------------------------------------------
POISON = [  # (body, field, words): values that pass a plain range check but cannot be computed in float32
    ({**COMPLETION, "temperature": 1e-39}, "temperature", "at least 0.01"),
    ({**COMPLETION, "temperature": 0.009}, "temperature", "at least 0.01"),
    ({**COMPLETION, "repetition_penalty": 1e-300}, "repetition_penalty", "[0.01, 100]"),
    ({**COMPLETION, "repetition_penalty": 1e300}, "repetition_penalty", "[0.01, 100]"),
    ({**COMPLETION, "top_k": 9223372036854775808}, "top_k", "less than 9223372036854775808"),
    ({**COMPLETION, "top_k": 10**30}, "top_k", "less than"),
    ({**COMPLETION, "logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias", "at most 1024"),
    ({**COMPLETION, "stop": ["x" * 100_000]}, "stop", "at most 256 characters"),
    ({**CHAT, "temperature": 1e-39}, "temperature", "at least 0.01"),
]


@pytest.mark.parametrize("body,field,words", POISON)
def test_poisonous_options_are_refused_naming_the_field(http, server, body, field, words):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error_of(http.post(route, json=body), 400, field, words)
    assert server.batcher.idle()


def test_a_huge_top_k_keeps_every_token(http):
    """top_k above the vocabulary is not an error: it keeps every token (as vLLM, which clamps it)."""
    base = {**COMPLETION, "temperature": 0.7, "seed": 3, "max_tokens": 8}
    plain = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert http.post("/v1/completions", json={**base, "top_k": 2**62}).json()["choices"][0]["text"] == plain


def poisoned(prompt: list[int], **params) -> tuple[Sequence, list]:
    """A sequence whose options bypass every check (as if a route forgot one): ``params`` are forced in."""
    sampling = SamplingParams(temperature=1.0)
    for name, value in params.items():
        object.__setattr__(sampling, name, value)
    events: list = []
    config = GenerationConfig(max_new_tokens=30, sampling=sampling)
    return Sequence(prompt, config, events.append), events


def chat_ids(lm, prompt: str) -> list[int]:
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)


async def stream_tokens(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, list[float], bool]:
    """One greedy streamed chat completion that ignores EOS: (text, per-token logprobs, ended with [DONE])."""
    body = {**CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logprobs": True, "ignore_eos": True}
    text, logprobs = "", []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return text, logprobs, True
            if line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]  # an error chunk has no choices: fails here
                text += choice["delta"].get("content") or ""
                logprobs += [t["logprob"] for t in (choice["logprobs"] or {"content": []})["content"]]
    return text, logprobs, False


def test_one_poisoned_sequence_fails_alone_while_8_clients_stream(server, lm, monkeypatch):
    """Poison at every depth — refused bodies over HTTP, and, past validation, options that overflow or cannot be
    built, a prompt the model cannot embed, NaN logits and a NaN probe score in one row — while 8 clients stream:
    each poisoned sequence gets its own error, the 8 get exactly what lm.generate gives them alone."""
    batcher = server.batcher
    ids = lm.encode("poison")
    cases = {"temperature": poisoned(ids, temperature=1e-39),
             "penalty": poisoned(ids, temperature=0.0, repetition_penalty=1e-300),
             "top_k": poisoned(ids, top_k=2**63),
             "prompt": poisoned(lm.encode("prefill poison")),
             "nan_logits": poisoned(ids),
             "nan_score": poisoned(lm.encode("score"), temperature=0.0)}
    nan_logits, nan_score = cases["nan_logits"][0], cases["nan_score"][0]
    engine = batcher.engine
    iteration, prefill_done, decode, sample = batcher.iteration, engine._prefill_done, engine._decode, engine.sample
    run_chunk = Prefill.run_chunk
    poison_prompt = cases["prompt"][0].prompt
    queued = threading.Event()  # the poison is in the queue
    sizes = []

    def held_iteration():  # the 8 start together (none can finish before the poison arrives) ...
        while len(engine.waiting) + len(engine.running) < 8 and not queued.wait(0.005):
            pass
        iteration()

    def held_decode(rows, tokens):  # ... and their first decode waits for it
        queued.wait(HANG_GUARD)
        decode(rows, tokens)
        for r in rows:
            if r.seq is nan_score:
                r.score = float("nan")

    def broken_prefill(job, out):  # one row's forward came out NaN (a broken checkpoint, for that row)
        prefill_done(job, out)
        for r in job.rows():
            if r.seq is nan_logits:
                r.logits = torch.full_like(r.logits, float("nan"))

    def counting_sample(logits, slots, *args):
        sizes.append(len(slots))
        return sample(logits, slots, *args)

    def failing_chunk(self, model, cache, layers=(), width=None):  # fails whenever it holds the poison prompt
        if any(row[mask.bool()].tolist() == poison_prompt for row, mask in zip(self.ids, self.mask)):
            raise RuntimeError("this prompt cannot be embedded")
        return run_chunk(self, model, cache, layers, width)

    monkeypatch.setattr(batcher, "iteration", held_iteration)
    for name, fn in [("_decode", held_decode), ("_prefill_done", broken_prefill), ("sample", counting_sample)]:
        monkeypatch.setattr(engine, name, fn)
    monkeypatch.setattr(Prefill, "run_chunk", failing_chunk)
    # every waiting prompt prefilled in one step (not a decode step's worth: StepClock), so that the poisoned rows
    # are sampled in one batch with the 8
    monkeypatch.setattr(engine.clock, "prefill_budget", lambda floor, share: 1_000_000)
    failed_before = batcher.failed
    prompts = [f"client {i} keeps streaming" + "!" * i for i in range(8)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD) as client:
            streams = [asyncio.create_task(stream_tokens(client, p, 40)) for p in prompts]
            await async_wait_for(lambda: len(engine.running) >= 8, "every stream to hold its slot", interval=0.005)
            refused = await asyncio.gather(*(client.post("/v1/completions", json=body) for body, *_ in POISON[:6]))
            batcher.submit_request([[seq] for seq, _ in cases.values()])
            queued.set()
            return refused, await asyncio.gather(*streams)

    refused, results = asyncio.run(main())
    assert [r.status_code for r in refused] == [400] * 6
    assert max(sizes) == 8 + len(cases) - 1  # the poison was sampled in the 8's batch (the bad prompt never was)
    for prompt, (text, logprobs, done) in zip(prompts, results):
        alone = lm.generate([chat_ids(lm, prompt)], max_new_tokens=40, ignore_eos=True)[0]
        assert done and text == alone.text, prompt
        assert logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    expected = {"temperature": "non-finite", "penalty": "non-finite", "top_k": "top_k must be in [0, 2**63)",
                "prompt": "prefill failed", "nan_logits": "logits are not finite", "nan_score": "score is not finite"}
    for name, (_, events) in cases.items():
        assert isinstance(events[-1], ErrorEvent) and expected[name] in events[-1].message, (name, events[-1:])
        assert all(not isinstance(e, ErrorEvent) for e in events[:-1])
    assert batcher.failed - failed_before == len(cases)
    assert batcher.idle() and len(engine.free) == batcher.max_batch


def test_a_checkpoint_with_nan_weights_fails_each_request_and_the_server_stays_up():
    lm = tiny_lm()
    with torch.no_grad():
        lm.model.norm.weight.fill_(float("nan"))  # NaN weights: every logit is NaN
    s = LiveServer(lm, max_len=64)
    try:
        with httpx.Client(base_url=s.url, timeout=HANG_GUARD) as http:
            for temperature in (0, 1):  # greedy (an argmax of NaN) and sampled (a multinomial of NaN)
                r = http.post("/v1/completions", json={**COMPLETION, "temperature": temperature})
                error_of(r, 500, None, "logits are not finite")
                assert r.json()["error"]["type"] == "server_error"
            with http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert "logits are not finite" in json.loads(lines[-2][6:])["error"]["message"]
            assert lines[-1] == "data: [DONE]"
            assert http.get("/health").json()["status"] == "ok" and s.batcher.failed == 3
    finally:
        s.close()


# --- item 3: the body's size is checked before it is buffered ---------------------------------------------------
def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HANG_GUARD)  # a hang guard, not a measurement


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test). A server
    closing with our bytes unread resets the connection: the end too, once its answer has arrived."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        if not out:
            raise
    return out


def send_until_answered(sock: socket.socket, chunks: list[bytes]) -> bytes:
    """Send ``chunks`` until the server answers (it need not read them all), then read its answer."""
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            break
        sock.sendall(chunk)
    return read_until_closed(sock)


HEAD = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def small_body_server(lm):
    s = LiveServer(lm, max_len=64, max_body_bytes=64 << 10)
    yield s
    s.close()


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body(small_body_server):
    with connect(small_body_server.url) as sock:
        sock.sendall((HEAD + f"Content-Length: {1 << 30}\r\n\r\n").encode())
        reply = send_until_answered(sock, [b"{" * 1024] * 16)  # 16 KiB of the 1 GiB declared
    assert reply.startswith(b"HTTP/1.1 413") and b"the limit is 65536" in reply


def test_a_streamed_body_is_refused_once_it_passes_the_limit(small_body_server):
    with connect(small_body_server.url) as sock:  # chunked: no length is declared, the count decides
        sock.sendall((HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode())
        reply = send_until_answered(sock, [b"2000\r\n" + b" " * 0x2000 + b"\r\n"] * 16)  # 128 KiB, never ending
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 65536 bytes" in reply


# --- item 4: no CPU work on the event loop ----------------------------------------------------------------------
class Stall:
    """Wraps a function so that a call on a marked text blocks (in whatever thread runs it) until released."""

    def __init__(self, fn, mark: str):
        self.fn, self.mark = fn, mark
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, first, *args, **kwargs):
        if self.mark in str(first):
            self.entered.set()
            self.release.wait(2 * HANG_GUARD)  # longer than the /health call's timeout: a stalled loop fails the test
        return self.fn(first, *args, **kwargs)


@pytest.mark.parametrize("what", ["tokenizer", "template"])
def test_health_and_other_requests_are_served_while_one_request_is_prepared(server, lm, monkeypatch, what):
    if what == "tokenizer":
        stall = Stall(lm.tokenizer.encode, "SLOW")
        monkeypatch.setattr(lm.tokenizer, "encode", stall)
        route, body = "/v1/completions", {**COMPLETION, "prompt": "SLOW"}
    else:
        stall = Stall(lm.tokenizer.apply_chat_template, "SLOW")
        monkeypatch.setattr(lm.tokenizer, "apply_chat_template", stall)
        route, body = "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "SLOW"}]}
    slow: dict = {}
    post = lambda: slow.update(r=httpx.post(server.url + route, json=body, timeout=3 * HANG_GUARD))  # outlasts it
    thread = threading.Thread(target=post)
    thread.start()
    try:
        assert stall.entered.wait(HANG_GUARD)
        with httpx.Client(base_url=server.url, timeout=HANG_GUARD) as http:
            assert http.get("/health").status_code == 200
            other = http.post("/v1/completions", json={**COMPLETION, "stream": True, "max_tokens": 8})
            assert other.status_code == 200 and other.text.endswith("data: [DONE]\n\n")
    finally:
        stall.release.set()
        thread.join(HANG_GUARD)
    assert slow["r"].status_code == 200


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(http, lm, monkeypatch):
    lengths = []
    encode = lm.tokenizer.encode

    def counting_encode(text, *args, **kwargs):
        lengths.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(lm.tokenizer, "encode", counting_encode)
    longest = max(len(t) for t in lm.tokenizer.backend.get_vocab(with_added_tokens=True))
    text = "x" * (256 * longest + 1)  # more characters than 256 tokens can hold
    error = error_of(http.post("/v1/completions", json={**COMPLETION, "prompt": text}), 400, "prompt",
                     "maximum context length is 256 tokens", f"{len(text)} characters")
    assert error["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": text[:1000]}, {"role": "user", "content": text[1000:]}]
    error_of(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400, "messages", "characters")
    assert not any(n > 256 * longest for n in lengths)  # the long texts never reached the tokenizer


# --- item 4 (bugs): every bad input is a 400 ---------------------------------------------------------------------
def post_raw(http: httpx.Client, raw: bytes, route: str = "/v1/completions") -> httpx.Response:
    return http.post(route, content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize("raw,words", [
    (b'{"model": "tiny", "prompt": "hi", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"model": "tiny", "prompt": "hi", "repetition_penalty": Infinity}', "Infinity is not a JSON value"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "NaN is not a JSON value"),
])
def test_json_that_python_reads_badly_is_a_400(http, raw, words):
    error_of(post_raw(http, raw), 400, None, "not valid JSON", words)


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {**COMPLETION, "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "a\ud800", "echo": True}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["fine", "\udfff"]}, "prompt[1]"),
    ("/v1/completions", {**COMPLETION, "model": "\ud800"}, "model"),
    ("/v1/completions", {**COMPLETION, "stop": ["\ud800"]}, "stop[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "user": "x\udbff"}, "user"),
    ("/v1/completions", {**COMPLETION, "\ud800": 1}, None),
])
def test_a_lone_surrogate_is_a_400_with_an_encodable_body(http, route, body, param):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a \\ud800 escape, valid JSON
    error = error_of(post_raw(http, raw, route), 400, param)
    assert "Unicode" in error["message"] or "unicode" in error["message"]


def test_an_error_quoting_a_surrogate_can_still_be_sent():
    from lucidlm.serve.errors import OpenAIError

    r = OpenAIError(404, "no model '\ud800'", param="\udfff").response()
    assert json.loads(r.body)["error"] == {"message": "no model '\\ud800'", "type": "invalid_request_error",
                                           "param": "\\udfff", "code": None}


@pytest.mark.parametrize("key", ["²", "١٢", "５", "-1", " 5", "5.0", "0x5", "9" * 5000])
def test_logit_bias_keys_are_ascii_token_ids(http, key):
    error_of(http.post("/v1/completions", json={**COMPLETION, "logit_bias": {key: 1}}), 400, "logit_bias")


def test_too_many_prompts_is_a_400_and_a_request_is_never_too_big_for_an_idle_queue(http, server):
    error_of(http.post("/v1/completions", json={**COMPLETION, "prompt": ["a"] * 1000}), 400, "prompt",
             "at most 16 prompts per request, got 1000")
    assert server.batcher.max_queue == 8
    r = http.post("/v1/completions", json={**COMPLETION, "prompt": [f"p{i}" for i in range(16)], "n": 2})
    assert r.status_code == 200, r.text  # 16 prompt groups on a queue of 8: the bound is for load
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(32)) and all(c["finish_reason"] for c in choices)


def test_chat_with_n_choices_returns_and_streams_every_choice(http):
    body = {**CHAT, "n": 3, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body)
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: three equal choices
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                        if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == texts


# --- slowloris: half-open connections are closed -----------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(lm):
    s = LiveServer(lm, max_len=64, header_timeout=0.5, body_timeout=0.5)
    yield s
    s.close()


def test_silent_and_half_sent_request_heads_are_closed(strict_server):
    socks = [connect(strict_server.url) for _ in range(6)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall([b"", b"POST /v1/comp", b"GET /health HTTP/1.1\r\nHost: x\r\n"][i % 3])
        assert [read_until_closed(sock) for sock in socks] == [b""] * 6  # closed without an answer
    finally:
        for sock in socks:
            sock.close()
    assert httpx.get(strict_server.url + "/health", timeout=HANG_GUARD).status_code == 200


def test_a_head_trickled_byte_by_byte_is_closed(strict_server):
    """Every byte received used to reset uvicorn's only timer: a trickling client was never closed."""
    with connect(strict_server.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.settimeout(0.05)
        deadline = time.monotonic() + HANG_GUARD
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: closed
                closed = True
    assert closed


def test_a_body_trickled_after_its_answer_is_closed(strict_server):
    """A route that answers without reading the body (404) leaves the body to arrive: not forever."""
    with connect(strict_server.url) as sock:
        sock.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        sock.settimeout(0.05)
        deadline = time.monotonic() + HANG_GUARD
        reply, closed = b"", False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
                chunk = sock.recv(65536)
                reply, closed = reply + chunk, chunk == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
    assert closed and reply.startswith(b"HTTP/1.1 404")


def test_a_body_that_stops_arriving_is_answered_408_and_closed(strict_server):
    with connect(strict_server.url) as sock:
        sock.sendall((HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"model": ')
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply


def test_connections_beyond_the_limit_are_answered_503(lm):
    s = LiveServer(lm, max_len=64, max_connections=4, header_timeout=HANG_GUARD)
    held = []
    try:
        connections = s.server.server_state.connections
        for _ in range(3):
            held.append(connect(s.url))
            held[-1].sendall(b"GET /health HTTP/1.1\r\n")
        wait_for(lambda: len(connections) == 3, "the server to accept the 3 connections")
        assert httpx.get(s.url + "/health", timeout=HANG_GUARD).status_code == 503
        for sock in held:
            sock.close()
        wait_for(lambda: not connections, "the server to see the 3 connections closed")
        assert httpx.get(s.url + "/health", timeout=HANG_GUARD).status_code == 200
    finally:
        for sock in held:
            sock.close()
        s.close()
