"""The official openai client against a live server: models, completions, chat, streaming; streamed text equals
the non-streamed text for the same seed; scores and log-probabilities are the engine's, and the scores equal a
full forward's at either probe alignment."""

from __future__ import annotations

import openai
import pytest
from live_server import MODEL, LiveServer, probed_tiny_lm
from waiting import HANG_GUARD

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Ada."}]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)


def chat_ids(lm):
    return lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_chat_matches_the_engine_and_streaming_matches_non_streaming(client, lm):
    options = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=42)
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, **options)
    expected = lm.generate([chat_ids(lm)], max_new_tokens=24, temperature=0.9, top_p=0.95, seed=42)[0]
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    scores = [s["score"] for s in choice.model_extra["token_scores"]]  # lucidlm's extension field
    assert scores == pytest.approx(expected.scores, abs=1e-5)
    full_forward = lm.token_scores(chat_ids(lm) + expected.token_ids)[len(chat_ids(lm)):]
    assert scores == pytest.approx(full_forward, abs=1e-5)
    assert full.usage.prompt_tokens == len(chat_ids(lm)) and full.usage.completion_tokens == len(expected.token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    streamed_scores = [s["score"] for c in chunks if c.choices for s in (c.choices[0].model_extra.get("token_scores")
                                                                         or [])]
    assert streamed_scores == pytest.approx(scores, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and chunks[-1].choices == []
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_batch_n_stop_and_stream(client, lm):
    prompts = ["Once upon a time", "The answer is"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0, n=2, logprobs=3)
    assert len(out.choices) == 4 and [c.index for c in out.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        expected = lm.generate(p, max_new_tokens=10)[0]
        for c in out.choices[2 * i: 2 * i + 2]:  # prompt i, choices j: index i·n + j; greedy, so equal
            assert c.text == expected.text
            assert c.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
            assert len(c.logprobs.top_logprobs[0]) <= 3
    stop = out.choices[0].text[3:5]
    if stop:
        stopped = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=10, temperature=0, stop=[stop])
        assert stopped.choices[0].text == out.choices[0].text[: out.choices[0].text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompts[0])

    full = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=12, seed=7)
    streamed = list(client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=12, seed=7, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert streamed[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"


@pytest.fixture(scope="module", params=["own", "predictive"])
def eos_server(request):
    """A server whose model has a second EOS that greedy decoding of PROMPT reaches at token 6."""
    lm = probed_tiny_lm(request.param)
    lm.hf_config = {"eos_token_id": lm.generate(PROMPT, max_new_tokens=12, ignore_eos=True)[0].token_ids[5]}
    server = LiveServer(lm, max_batch=8, max_queue=8, max_len=MAX_LEN)
    yield lm, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)
    server.close()


PROMPT, MAX_LEN = "Once upon a time", 48


def test_token_scores_equal_a_full_forward_streamed_or_not(eos_server):
    lm, client = eos_server
    ids = lm.encode(PROMPT)
    stop = lm.generate(PROMPT, max_new_tokens=12, ignore_eos=True)[0].text[2:4]
    cases = [(dict(max_tokens=12, extra_body={"ignore_eos": True}), dict(max_new_tokens=12, ignore_eos=True)),
             (dict(max_tokens=12), dict(max_new_tokens=12)),  # EOS
             (dict(max_tokens=12, stop=[stop], extra_body={"ignore_eos": True}),
              dict(max_new_tokens=12, stop=[stop], ignore_eos=True)),
             (dict(max_tokens=MAX_LEN - len(ids), extra_body={"ignore_eos": True}),  # the slot's last cell: its
              dict(max_new_tokens=MAX_LEN - len(ids), ignore_eos=True))]  # last token's ("own" feeds it once more)
    reasons = []
    for request, options in cases:
        expected = lm.generate(PROMPT, **options)[0]
        want = lm.token_scores(ids + expected.token_ids)[len(ids):]  # the last token's score included
        full = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, **request).choices[0]
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, stream=True, **request))
        streamed = [s["score"] for c in chunks for s in (c.choices[0].model_extra.get("token_scores") or [])]
        assert full.text == expected.text and full.finish_reason == expected.finish_reason
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert [s["score"] for s in full.model_extra["token_scores"]] == pytest.approx(want, abs=1e-5)
        assert streamed == pytest.approx(want, abs=1e-5)
        reasons.append(expected.finish_reason)
    assert reasons == ["length", "stop", "stop", "length"]


def test_best_of_returns_the_best_samples_by_logprob_or_by_the_probe(client, lm):
    from lucidlm.probe.selective import lowest_max_score

    options = dict(max_tokens=10, temperature=1.0, seed=5)
    for scorer, name in [(None, "mean_logprob"), (lowest_max_score, "lowest_max_score")]:
        extra = {} if scorer is None else {"best_of_scorer": name}
        out = client.completions.create(model=MODEL, prompt="Hello", best_of=4, extra_body=extra, **options)
        kwargs = {} if scorer is None else {"scorer": scorer}
        expected = lm.generate("Hello", best_of=4, max_new_tokens=10, temperature=1.0, seed=5, **kwargs)[0]
        assert out.choices[0].text == expected.text, name
        assert out.usage.completion_tokens == sum(len(c.token_ids) for c in lm.sample("Hello", n=4, max_new_tokens=10,
                                                                                      temperature=1.0, seed=5))
    two = client.completions.create(model=MODEL, prompt=["Hello", "Bye"], n=2, best_of=3, **options)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(["Hello", "Bye"]):
        samples = lm.sample(prompt, n=3, max_new_tokens=10, temperature=1.0, seed=5)
        ranked = sorted(samples, key=lambda c: c.mean_logprob, reverse=True)[:2]  # prompt i: choices 2i, 2i+1
        assert [c.text for c in two.choices[2 * i: 2 * i + 2]] == [c.text for c in ranked]


def test_a_batch_of_prompts_larger_than_the_server_batch_queues_prompt_by_prompt(client, live, lm):
    prompts = [f"prompt number {i}" for i in range(20)]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert len(out.choices) == 40 > live.batcher.max_batch
    expected = lm.generate(prompts, max_new_tokens=4)
    assert [c.text for c in out.choices] == [e.text for e in expected for _ in range(2)]


def test_sampling_options_beyond_openai_reach_the_sampler(client, lm):
    options = dict(temperature=0.7, top_k=5, min_p=0.05, repetition_penalty=1.2, seed=3)
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, presence_penalty=0.3,
                                    frequency_penalty=0.2, extra_body=options)
    expected = lm.generate("Hello", max_new_tokens=12, presence_penalty=0.3, frequency_penalty=0.2, **options)[0]
    assert out.choices[0].text == expected.text
    biased = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                       logit_bias={str(lm.encode("Z", add_special_tokens=False)[0]): 100})
    assert biased.choices[0].text == "ZZZ"


def test_errors_reach_the_client_as_typed_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
