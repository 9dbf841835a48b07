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


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}
SURROGATE_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "city\ud800": {"type": "string"}}}}}
CALLED = [{"role": "user", "content": "weather?"},
          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                "function": {"name": "f", "arguments": '{"city": "\udc00"}'}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


@pytest.mark.parametrize("path, body, param, words", [
    # the structured-output and tool fields carry text too: lone surrogates named by field
    ("/v1/chat/completions", {"messages": CHAT, "tools": [SURROGATE_TOOL]}, "tools", "surrogate"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\ud800"]}}}},
     "response_format", "surrogate"),
    ("/v1/chat/completions", {"messages": CHAT, "guided_choice": ["yes", "\udfff"]}, "guided_choice", "surrogate"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a\ud800"}, "guided_regex", "surrogate"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"grammar": "root ::= \"\ud800\""}},
     "structured_outputs", "surrogate"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"mood\ud800": 1}},
     "chat_template_kwargs", "surrogate"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ '\ud800' }}"}, "chat_template", "surrogate"),
    ("/v1/chat/completions", {"messages": CALLED, "tools": [TOOL]}, "messages", "surrogate"),
    ("/tokenize", {"messages": CHAT, "tools": [SURROGATE_TOOL]}, "tools", "surrogate"),
    # a request's broken template is named, with jinja2's reason, never a 500
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{% if %}"}, "chat_template",
     "failed on these messages (TemplateSyntaxError"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ raise_exception('no tools here') }}"},
     "chat_template", "no tools here"),
    ("/tokenize", {"messages": CHAT, "chat_template": "{{ messages[0].nope.deeper }}"}, "chat_template",
     "UndefinedError"),
    ("/v1/chat/completions", {"messages": CHAT, "continue_final_message": True}, "continue_final_message",
     "add_generation_prompt"),
])
def test_structured_and_tool_fields_named_400(server, path, body, param, words):
    test_field_named_400(server, path, body, param, words)


def test_conversation_too_long_to_fit_is_refused_before_tokenizing(server):
    """Text parts and tool definitions count: the length bound is checked on the loop for the
    messages, and on the preprocessing thread for the rendered conversation (tools included)."""
    limit = 81 * server.max_model_len  # the bundled tokenizer's longest token x max_model_len
    parts = [{"type": "text", "text": "word " * (limit // 10)}] * 3
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert f"({limit})" in r.json()["error"]["message"]
    big_tool = {"type": "function", "function": {"name": "f", "description": "word " * (limit // 4)}}
    for path in ("/v1/chat/completions", "/tokenize"):
        r = _post(server, path, {"messages": CHAT, "tools": [big_tool]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "characters" in r.json()["error"]["message"] and f"({limit})" in r.json()["error"]["message"]


def test_server_still_serves_after_limits(server):
    r = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": ["x"] * 32})
    assert r.status_code == 200, r.text
    m = server.wait_idle()
    assert m["nanovllm:kv_cache_usage_perc"] == 0
