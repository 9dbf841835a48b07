"""Conventions of OpenAI / vLLM servers: ignored OpenAI fields, /version, /ping, X-Request-Id,
CORS (off by default), text-only content, chat templates per request."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

import nanovllm


def _chat(server, extra: dict, headers: dict | None = None):
    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    return httpx.post(server.v1 + "/chat/completions", json=body, headers={**server.headers, **(headers or {})},
                      timeout=60)


def test_openai_fields_that_change_nothing_are_accepted(client, server):
    out = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, store=True,
        metadata={"team": "qa"}, user="u-1", service_tier="auto", parallel_tool_calls=True,
        response_format={"type": "text"})
    assert out.choices[0].message.content is not None
    r = httpx.post(server.v1 + "/completions", headers=server.headers, timeout=60,
                   json={"model": server.model, "prompt": "Hi", "max_tokens": 2, "user": "u", "store": False,
                         "metadata": {"a": "b"}, "service_tier": "default"})
    assert r.status_code == 200, r.text


def test_version_and_ping_need_no_key(server):
    r = httpx.get(server.url + "/version", headers=server.headers, timeout=10)
    assert r.status_code == 200 and r.json() == {"version": nanovllm.__version__}
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/ping", timeout=10)  # no API key
        assert r.status_code == 200, r.text


def test_x_request_id_is_honoured_and_echoed(server):
    r = _chat(server, {}, {"X-Request-Id": "job-42.a"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "job-42.a"
    assert r.json()["id"] == "chatcmpl-job-42.a"
    # the same id again at once is fine (engine ids stay unique), and streaming chunks carry it
    with httpx.stream("POST", server.v1 + "/chat/completions", headers={**server.headers, "X-Request-Id": "job-42.a"},
                      json={"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                            "stream": True}, timeout=60) as s:
        assert s.headers["x-request-id"] == "job-42.a"
        first = next(line for line in s.iter_lines() if line.startswith("data: {"))
    assert '"id":"chatcmpl-job-42.a"' in first
    r = _chat(server, {})
    assert len(r.headers["x-request-id"]) == 32  # made up when the client sends none
    assert r.json()["id"] == "chatcmpl-" + r.headers["x-request-id"]
    errors = httpx.post(server.v1 + "/chat/completions", json={}, headers={**server.headers, "X-Request-Id": "e-1"})
    assert errors.status_code == 400 and errors.headers["x-request-id"] == "e-1"


def test_cors_is_off_by_default(server):
    r = httpx.options(server.v1 + "/chat/completions", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
def test_image_and_audio_parts_are_refused(server, part):
    r = _chat(server, {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]})
    assert r.status_code == 400
    assert "text-only" in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"


def test_text_parts_and_chat_template_per_request(server):
    def tokenize(body):
        r = httpx.post(server.url + "/tokenize", json=body, headers=server.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}]
    assert tokenize({"messages": parts}) == tokenize({"messages": plain})
    template = "{% for m in messages %}[{{ m.content }}|{{ mood }}]{% endfor %}"
    ids = tokenize({"messages": plain, "chat_template": template, "chat_template_kwargs": {"mood": "calm"}})
    assert ids == tokenize({"prompt": "[Hello\nthere|calm]", "add_special_tokens": False})
    r = _chat(server, {"messages": plain, "chat_template": template, "chat_template_kwargs": {"mood": "calm"}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
    r = _chat(server, {"chat_template_kwargs": {"add_generation_prompt": False}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


@pytest.fixture(scope="module")
def cors_url(tiny_model_factory):
    import uvicorn

    from nanovllm.config import EngineConfig
    from nanovllm.engine.async_engine import AsyncLLMEngine
    from nanovllm.serve.app import CorsSettings, build_app

    engine = AsyncLLMEngine.from_config(EngineConfig(
        model=tiny_model_factory("qwen3"), device="cpu", skip_tokenizer_init=True, max_model_len=64,
        load_format="dummy"))
    app = build_app(engine, "tiny", api_key="k", cors=CorsSettings(["https://app.example"], ["POST"], ["*"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)
    engine.shutdown()


def test_cors_with_allowed_origins(cors_url):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(cors_url + "/v1/completions", headers={"Origin": "https://app.example", **preflight}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(cors_url + "/v1/completions", headers={"Origin": "https://evil.example", **preflight}, timeout=10)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    # answers, errors included, carry the header for the allowed origin
    r = httpx.post(cors_url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 1},
                   headers={"Origin": "https://app.example"}, timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
