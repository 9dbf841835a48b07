"""The real server (bundled SmolLM2) used through the official openai client."""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _tokens(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body, headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_list_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert models[0].max_model_len == server.max_model_len
    assert client.models.retrieve(server.model).id == server.model


def test_completion_and_usage(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.index == 0
    assert choice.text and choice.finish_reason == "length"
    assert len(choice.model_extra["token_ids"]) == 6
    prompt_tokens = len(_tokens(server, prompt=PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens, 6, prompt_tokens + 6)
    # the same prompt as token ids gives the same greedy text
    ids = _tokens(server, prompt=PROMPT)
    again = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text


def test_batch_of_prompts(client, server):
    prompts = [PROMPT, "One, two, three,"]
    out = client.completions.create(model=server.model, prompt=prompts, max_tokens=3, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: the n copies agree
    single = client.completions.create(model=server.model, prompt=prompts[1], max_tokens=3, temperature=0)
    assert out.choices[2].text == single.choices[0].text
    prompt_tokens = sum(len(_tokens(server, prompt=p)) for p in prompts)
    assert out.usage.prompt_tokens == prompt_tokens
    ids = [_tokens(server, prompt=p) for p in prompts]
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=3, temperature=0)
    assert [c.text for c in by_ids.choices] == [out.choices[0].text, out.choices[2].text]


def test_chat_stream_matches_non_streamed(client, server):
    full = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    answer = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and answer
    assert full.usage.prompt_tokens == len(_tokens(server, messages=CHAT))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    deltas, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                deltas.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(deltas) == answer
    assert len(deltas) > 1  # really streamed
    assert roles == ["assistant"]
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_wire_format(server):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.v1 + "/completions", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    plain = httpx.post(server.v1 + "/completions", json=dict(body, stream=False), headers=server.headers,
                       timeout=60).json()
    assert text == plain["choices"][0]["text"]


def test_n2_chat(client, server):
    kwargs = dict(model=server.model, messages=CHAT, max_tokens=5, n=2, temperature=1.0, seed=1,
                  extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 10
    again = client.chat.completions.create(**kwargs)  # seeded sampling is reproducible
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_completion_logprobs(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset[0] == 0


def test_chat_logprobs(client, server):
    out = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_tokenize_detokenize(server):
    ids = _tokens(server, prompt="Hello world")
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=server.headers, timeout=30)
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world"


def test_stop_string(client, server):
    out = client.completions.create(model=server.model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                    stop=[" 6"])
    choice = out.choices[0]
    assert " 6" not in choice.text
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == " 6"


def test_echo_logit_bias_and_vllm_extras(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert out.choices[0].text.startswith(PROMPT) and len(out.choices[0].text) > len(PROMPT)
    forced = _tokens(server, prompt=" banana")[-1]
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={str(forced): 100},
                                    extra_body={"return_token_ids": True, "top_k": 5, "min_tokens": 3})
    assert out.choices[0].model_extra["token_ids"] == [forced] * 3
