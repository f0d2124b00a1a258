"""Every bad input gets a 4xx with an OpenAI error object naming the problem — before anything is queued;
never a 500, never a stream left hanging."""

from __future__ import annotations

import httpx
import pytest
from live_server import MODEL, LiveServer
from waiting import HANG_GUARD

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}

BAD = [
    # (route, body, status, param, words in the message)
    ("chat", {**CHAT, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("chat", {k: v for k, v in CHAT.items() if k != "messages"}, 400, "messages", "required"),
    ("chat", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
    ("chat", {**CHAT, "messages": [{"content": "hi"}]}, 400, "messages[0].role", "required"),
    ("chat", {**CHAT, "messages": "hi"}, 400, "messages", "list"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, "temperature", "number"),
    ("chat", {**CHAT, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("chat", {**CHAT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("chat", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens", "integer"),
    ("chat", {**CHAT, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("chat", {**CHAT, "stream": "yes"}, 400, "stream", "boolean"),
    ("chat", {**CHAT, "presence_penalty": 5}, 400, "presence_penalty", "less than or equal to 2"),
    ("chat", {**CHAT, "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs", "less than or equal to 20"),
    ("chat", {**CHAT, "top_logprobs": 2}, 400, None, "top_logprobs needs logprobs"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("chat", {**CHAT, "stop": [""]}, 400, "stop", "non-empty"),
    ("chat", {**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ("chat", {**CHAT, "logit_bias": {"5": 200}}, 400, "logit_bias", "[-100, 100]"),
    ("chat", {**CHAT, "logit_bias": {"99999": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, 400, None, "only allowed when stream"),
    ("chat", {**CHAT, "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("chat", {**CHAT, "top_k": -1}, 400, "top_k", "greater than or equal to 0"),
    ("chat", {**CHAT, "repetition_penalty": 0}, 400, "repetition_penalty", "must be in [0.01, 100]"),
    ("chat", {**CHAT, "frobnicate": 1}, 400, "frobnicate", "unrecognized"),
    ("chat", {**CHAT, "max_tokens": 250}, 400, "messages", "maximum context length is 256"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}], "max_tokens": None}, 400, "messages",
     "maximum context length"),
    ("chat", {**CHAT, "n": 40}, 400, "n", "less than or equal to 16"),
    ("completions", {k: v for k, v in COMPLETION.items() if k != "prompt"}, 400, "prompt", "required"),
    ("completions", {**COMPLETION, "prompt": ""}, 400, "prompt", "empty"),
    ("completions", {**COMPLETION, "prompt": []}, 400, "prompt", "empty"),
    ("completions", {**COMPLETION, "prompt": [5, 999999]}, 400, "prompt", "outside"),
    ("completions", {**COMPLETION, "prompt": 42}, 400, "prompt", "valid"),
    ("completions", {**COMPLETION, "logprobs": 25}, 400, "logprobs", "less than or equal to 20"),
    ("completions", {**COMPLETION, "prompt": "x" * 300}, 400, "prompt", "maximum context length"),
    ("completions", {**COMPLETION, "echo": True, "logprobs": 1}, 400, "echo", "not supported"),
    ("completions", {**COMPLETION, "n": 2, "best_of": 1}, 400, None, "best_of (1) must be >= n (2)"),
    ("completions", {**COMPLETION, "best_of": 3, "stream": True}, 400, None, "cannot be streamed"),
    ("completions", {**COMPLETION, "best_of": 40}, 400, "best_of", "less than or equal to 16"),
    ("completions", {**COMPLETION, "best_of_scorer": "vibes"}, 400, "best_of_scorer", "'mean_logprob'"),
]


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client:
        yield client


def route(name: str) -> str:
    return "/v1/chat/completions" if name == "chat" else "/v1/completions"


# the same bodies asking for a stream: still a plain JSON 4xx, no stream opened (stream_options is valid there)
BAD_STREAMED = [(name, {**body, "stream": True}, *rest) for name, body, *rest in BAD
                if "stream_options" not in body and "stream" not in body]


@pytest.mark.parametrize("name,body,status,param,words", BAD + BAD_STREAMED)
def test_bad_input_is_a_4xx_naming_the_field(http, live, name, body, status, param, words):
    r = http.post(route(name), json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert words in error["message"] and error["type"] in ("invalid_request_error",)
    assert error["param"] == param
    assert live.batcher.idle()  # nothing was queued


def test_malformed_json_wrong_body_and_unknown_routes(http):
    for raw in [b"{not json", b"", b"\xff\xfe", b'{"model": "tiny",']:
        r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_ranking_by_the_probe_needs_a_probe():
    from tiny_lm import tiny_lm

    server = LiveServer(tiny_lm(), max_len=128)
    try:
        body = {**COMPLETION, "best_of": 2, "best_of_scorer": "lowest_max_score"}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=HANG_GUARD)
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of_scorer"
        assert "--probe" in r.json()["error"]["message"]
        ok = httpx.post(server.url + "/v1/completions", json=COMPLETION, timeout=HANG_GUARD).json()
        assert "token_scores" not in ok["choices"][0]  # no probe, no extension field
    finally:
        server.close()


def test_a_full_queue_answers_429_at_once(lm):
    server = LiveServer(lm, max_batch=1, max_queue=0, max_len=256)
    try:
        with httpx.Client(base_url=server.url, timeout=HANG_GUARD) as http:
            body = {**CHAT, "max_tokens": 200, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as running:
                next(running.iter_lines())  # the first chunk: the slot is taken
                r = http.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                assert "busy" in r.json()["error"]["message"]
            assert http.get("/health").json()["status"] == "ok"
    finally:
        server.close()
