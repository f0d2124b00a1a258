"""Load: 32 concurrent streaming clients, several requests each, all complete with exactly the tokens their
prompt gets alone (so no stream received another's tokens), no errors; a client that disconnects frees its
slot while the others carry on undisturbed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from live_server import MODEL, LiveServer
from waiting import HANG_GUARD, async_wait_for, wait_for

CLIENTS, REQUESTS, TOKENS = 32, 3, 12


@pytest.fixture(scope="module")
def server(lm):
    s = LiveServer(lm, max_batch=32, max_queue=128, max_len=256)
    yield s
    s.close()


async def stream_chat(http: httpx.AsyncClient, prompt: str, max_tokens: int, stop_after: int | None = None):
    """One streamed chat completion: (text, per-token logprobs, finish reason, chunk ids)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logprobs": True}
    text, logprobs, finish, ids, chunks = "", [], None, set(), 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text, logprobs, finish, ids, True
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            ids.add(chunk["id"])
            choice = chunk["choices"][0]
            text += choice["delta"].get("content") or ""
            if choice["logprobs"]:
                logprobs += [t["logprob"] for t in choice["logprobs"]["content"]]
            finish = choice["finish_reason"] or finish
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return text, logprobs, finish, ids, False  # leaves the block: the connection is closed
    raise AssertionError("the stream ended without [DONE]")


def prompt_of(client: int, request: int) -> str:
    return f"client {client} asks question {request}: " + "why" * (client % 5)


def test_32_concurrent_streaming_clients_get_their_own_tokens(server, lm):
    async def client(http, i):
        return [await stream_chat(http, prompt_of(i, k), TOKENS) for k in range(REQUESTS)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD) as http:
            return await asyncio.gather(*(client(http, i) for i in range(CLIENTS)))

    steps_before = server.batcher.steps
    results = asyncio.run(main())
    decode_steps = server.batcher.steps - steps_before
    for i, per_client in enumerate(results):
        for k, (text, logprobs, finish, ids, done) in enumerate(per_client):
            ids_alone = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt_of(i, k)}], tokenize=True)
            alone = lm.generate([ids_alone], max_new_tokens=TOKENS)[0]
            assert done and len(ids) == 1
            assert text == alone.text and finish == alone.finish_reason, (i, k)
            assert logprobs == pytest.approx(alone.logprobs, abs=1e-4), (i, k)
    # batched for real: far fewer decode forwards than the tokens streamed
    assert decode_steps < CLIENTS * REQUESTS * TOKENS / 4
    assert server.batcher.idle()


def test_a_disconnecting_client_frees_its_slot_and_disturbs_no_one(server, lm, monkeypatch):
    batcher = server.batcher
    decode = batcher.engine._decode

    def slow_decode(rows, tokens):  # a larger model's step time, so the long request is still running ...
        time.sleep(0.005)
        for r in rows:  # ... however slowly its client (on a loaded machine) gets to hang up: it never finishes
            if r.seq.config.max_new_tokens == 200 and len(r.seq.generated) >= 100:
                wait_for(lambda seq=r.seq: seq.cancelled, "the server to notice that the client hung up")
        return decode(rows, tokens)

    monkeypatch.setattr(batcher.engine, "_decode", slow_decode)
    cancelled_before = batcher.cancelled

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD) as http:
            leaver = asyncio.create_task(stream_chat(http, "I will hang up", 200, stop_after=3))
            stayers = [asyncio.create_task(stream_chat(http, prompt_of(i, 9), 40)) for i in range(8)]
            await leaver
            # the next scheduling step drops it
            await async_wait_for(lambda: batcher.cancelled > cancelled_before, "the hung-up row to be dropped")
            freed = batcher.cancelled - cancelled_before
            return freed, await asyncio.gather(*stayers)

    freed, stayers = asyncio.run(main())
    assert freed == 1
    for i, (text, logprobs, finish, _, done) in enumerate(stayers):
        ids_alone = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt_of(i, 9)}], tokenize=True)
        alone = lm.generate([ids_alone], max_new_tokens=40)[0]
        assert done and text == alone.text and finish == alone.finish_reason
        assert logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert batcher.idle() and len(batcher.engine.free) == batcher.max_batch
