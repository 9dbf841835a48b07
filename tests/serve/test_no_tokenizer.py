"""A bare server: no tokenizer (--skip-tokenizer-init, random dummy weights), token-id completions only,
and no web pages (--no-web-ui)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncLLMEngine

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def bare(tiny_model_factory):
    import uvicorn

    from nanovllm.serve.app import build_app

    engine = AsyncLLMEngine.from_config(EngineConfig(
        model=tiny_model_factory("qwen3"), device="cpu", skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN,
        load_format="dummy"))
    app = build_app(engine, "tiny", max_body_bytes=4096, web_ui=False)
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


@pytest.mark.parametrize("path", ["/", "/dashboard", "/ui/chat.js"])
def test_no_web_ui(bare, path):
    r = httpx.get(bare + path, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_token_id_completion(bare):
    body = {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    r = httpx.post(bare + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "" and len(choice["token_ids"]) == 5
    assert r.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    # a batch of token-id prompts
    r = httpx.post(bare + "/v1/completions", json=dict(body, prompt=[[1, 2], [3, 4, 5]], n=2), timeout=60)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert all(len(c["token_ids"]) == 5 for c in r.json()["choices"])


def test_streaming_sends_one_chunk_per_step(bare):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 6, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", bare + "/v1/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == 6
    assert all(len(c["choices"][0]["token_ids"]) == 1 and c["choices"][0]["text"] == "" for c in token_chunks)
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    plain = httpx.post(bare + "/v1/completions", json=dict(body, stream=False), timeout=60).json()
    assert [c["choices"][0]["token_ids"][0] for c in token_chunks] == plain["choices"][0]["token_ids"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "text needs a tokenizer"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/tokenize", {"prompt": "hi"}),
    ("/detokenize", {"tokens": [1]}),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": MAX_MODEL_LEN}),
])
def test_text_features_refused(bare, path, body):
    r = httpx.post(bare + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_configurable_body_limit(bare):
    r = httpx.post(bare + "/v1/completions", json={"prompt": list(range(2000))}, timeout=60)
    assert r.status_code == 413

    def chunked():  # no Content-Length: the limit is counted while reading
        yield b'{"prompt": ['
        for _ in range(1000):
            yield b"1, 2, 3, 4, "
        yield b"5]}"

    r = httpx.post(bare + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "request_too_large"


def test_no_api_key_means_open(bare):
    assert httpx.get(bare + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"


def test_bench_against_token_only_server(bare):
    from nanovllm.bench.serve import benchmark, parse_args

    args = parse_args(["--base-url", bare, "--num-prompts", "12", "--max-concurrency", "4", "--input-len", "8",
                       "--output-len", "4", "--ignore-eos", "--request-rate", "50", "--token-id-range", "3", "900",
                       "--no-save"])
    s = asyncio.run(benchmark(args))
    assert s["failed"] == 0, s["errors"]
    assert s["completed"] == 12 and s["total_output_tokens"] == 48
    assert s["median_itl_ms"] > 0 and s["median_tpot_ms"] > 0
