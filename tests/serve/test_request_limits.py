"""Limits and field-named 400s over real HTTP (the shared bundled-model server): stop strings,
lone surrogates, engine refusals; every one in the OpenAI error shape with `param` set."""

from __future__ import annotations

import json

import httpx
import pytest

CHAT = [{"role": "user", "content": "hi"}]


def _post(server, path, body):
    # json.dumps keeps lone surrogates as "\ud800" escapes, exactly what a hostile client sends
    return httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                      headers=dict(server.headers, **{"Content-Type": "application/json"}))


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 33}, "stop", "at most 32"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a" * 1000, "b" * 1049]}, "stop", "2049 characters"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": ["s"] * 10000}, "stop", "at most 32"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(2000))}, "stop_token_ids", "at most 1024"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt", "lone UTF-16 surrogate"),
    ("/v1/completions", {"prompt": ["fine", "a\udfffb"]}, "prompt", "lone UTF-16 surrogate"),
    ("/v1/completions", {"prompt": "hi", "stop": "\ud800"}, "stop", "lone UTF-16 surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\ud800"}]}, "messages", "surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages", "surrogate"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt", "surrogate"),
    ("/v1/completions", {"prompt": [10 ** 9]}, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": "hi", "n": 65}, "n", "max_num_seqs"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10 ** 6]}, "stop_token_ids", "vocabulary"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1000000": 1}}, "logit_bias", "vocabulary"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 65}, "n", "max_num_seqs"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 10}, "min_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
])
def test_field_named_400(server, path, body, param, words):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert err["param"] == param, err
    assert words in err["message"], err
    assert "codec" not in err["message"] and "Traceback" not in err["message"]


def test_server_still_serves_after_limits(server):
    r = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": ["x"] * 32})
    assert r.status_code == 200, r.text
    m = server.wait_idle()
    assert m["nanovllm:kv_cache_usage_perc"] == 0
