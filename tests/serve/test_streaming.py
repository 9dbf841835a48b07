"""Streamed responses of the real server: several prompts in one request, echo, logprobs.

Each streamed answer must say what the plain (non-streamed) answer to the same request says,
chunk by chunk reassembled per choice index.
"""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import pytest

PROMPTS = ["The capital of France is", "One, two, three,"]
CHAT = [{"role": "user", "content": "Name a colour."}]


def sse_chunks(server, path: str, body: dict) -> list[dict]:
    """The JSON chunks of one streamed request (the final [DONE] checked and dropped)."""
    with httpx.stream("POST", server.v1 + path, json=dict(body, stream=True), headers=server.headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def plain(server, path: str, body: dict) -> dict:
    r = httpx.post(server.v1 + path, json=dict(body, stream=False), headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def by_index(chunks: list[dict]) -> dict[int, list[dict]]:
    choices = defaultdict(list)
    for c in chunks:
        for choice in c["choices"]:
            choices[choice["index"]].append(choice)
    return choices


def test_several_prompts_streamed_with_echo(server):
    body = {"model": server.model, "prompt": PROMPTS, "max_tokens": 5, "temperature": 0, "n": 2, "echo": True,
            "ignore_eos": True}
    streamed = by_index(sse_chunks(server, "/completions", body))
    expected = {c["index"]: c for c in plain(server, "/completions", body)["choices"]}
    assert sorted(streamed) == sorted(expected) == [0, 1, 2, 3]  # prompt_index * n + completion_index
    for index, parts in streamed.items():
        prompt = PROMPTS[index // 2]
        assert parts[0]["text"].startswith(prompt)  # the prompt once, in the choice's first chunk
        assert all(not p["text"].startswith(prompt) for p in parts[1:])
        text = "".join(p["text"] for p in parts)
        assert text == expected[index]["text"] and len(text) > len(prompt)
        assert [p["finish_reason"] for p in parts if p["finish_reason"]] == ["length"]


def test_several_prompts_streamed_with_logprobs(server):
    body = {"model": server.model, "prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "ignore_eos": True}
    streamed = by_index(sse_chunks(server, "/completions", body))
    expected = {c["index"]: c for c in plain(server, "/completions", body)["choices"]}
    assert sorted(streamed) == [0, 1]
    for index, parts in streamed.items():
        tokens = [t for p in parts for t in p["logprobs"]["tokens"]]
        token_logprobs = [lp for p in parts for lp in p["logprobs"]["token_logprobs"]]
        offsets = [o for p in parts for o in p["logprobs"]["text_offset"]]
        want = expected[index]["logprobs"]
        assert tokens == want["tokens"] and "".join(tokens) == "".join(p["text"] for p in parts)
        assert token_logprobs == pytest.approx(want["token_logprobs"], abs=1e-4)
        # offsets run on across chunks: each token starts where the previous one ended
        assert offsets == want["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_with_logprobs_is_refused_when_streamed(server):
    body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 2, "echo": True, "logprobs": 1,
            "stream": True}
    r = httpx.post(server.v1 + "/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_chat_streamed_logprobs_match_non_streamed(server):
    body = {"model": server.model, "messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    parts = by_index(sse_chunks(server, "/chat/completions", body))[0]
    full = plain(server, "/chat/completions", body)["choices"][0]
    content = [t for p in parts if p.get("logprobs") for t in p["logprobs"]["content"]]
    want = full["logprobs"]["content"]
    assert [t["token"] for t in content] == [t["token"] for t in want]
    assert "".join(t["token"] for t in content) == full["message"]["content"]
    for got, exp in zip(content, want):
        assert got["logprob"] == pytest.approx(exp["logprob"], abs=1e-4)
        assert [t["token"] for t in got["top_logprobs"]] == [t["token"] for t in exp["top_logprobs"]]
