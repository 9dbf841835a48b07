"""`nanovllm serve --engine-process`: the engine in a process of its own behind the same HTTP API.

Some of the server tests run a second time here, against an engine-process server: the
`server` / `client` fixtures below shadow conftest's for the tests imported into this
module. Besides: the same greedy text as the default server (completions and chat,
streamed and not), SIGTERM drains (last: it stops the server, and its engine process must
be gone afterwards), and a killed engine process ends the server with exit code 1 and a
message naming the cause, every live stream getting an error event first.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time

import httpx
import pytest

import test_server_hardening as hardening
from conftest import launch_server
from test_errors import test_concurrent_requests_with_disconnects  # noqa: F401  aborted requests free their blocks
from test_openai_api import (test_chat_stream_matches_non_streamed, test_completion_logprobs,  # noqa: F401
                             test_n2_chat, test_sse_wire_format, test_stop_string)
from test_structured_outputs import test_bad_constraints_are_400, test_json_object_and_guided_json  # noqa: F401

DRAIN_MAX_MODEL_LEN = 4096  # the drain test's long requests ask for 2000 tokens
DIED_WITHIN_S = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from launch_server(tmp_path_factory, ["--engine-process",
                                                "--shutdown-timeout", str(hardening.SHUTDOWN_TIMEOUT_S)],
                             api_key=hardening.KEY, max_model_len=DRAIN_MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def engine_process_pid(server_pid: int, timeout: float = 30.0) -> int:
    """The pid of the server's engine process (its multiprocessing child that is not the resource tracker)."""
    deadline = time.monotonic() + timeout
    while True:
        for task in os.listdir(f"/proc/{server_pid}/task"):
            with open(f"/proc/{server_pid}/task/{task}/children") as f:
                for pid in map(int, f.read().split()):
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmdline = c.read()
                    if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                        return pid
        assert time.monotonic() < deadline, "no engine process found"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _sse(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, headers=server.headers, json=dict(body, stream=True),
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _answers(server) -> dict:
    """Greedy completions and chat answers, streamed and not (texts and token ids)."""
    prompts = ["The capital of France is", "One, two, three,", "def fibonacci(n):"]
    completion = {"model": server.model, "prompt": prompts, "max_tokens": 16, "temperature": 0,
                  "return_token_ids": True}
    chat = {"model": server.model, "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 16, "temperature": 0}
    post = httpx.post(server.url + "/v1/completions", headers=server.headers, json=completion, timeout=120).json()
    out = {"completions": [(c["text"], c["token_ids"]) for c in post["choices"]]}
    streamed: dict[int, str] = {}
    for chunk in _sse(server, "/v1/completions", completion):
        for c in chunk["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    out["completions_streamed"] = [streamed[i] for i in range(len(prompts))]
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, json=chat, timeout=120).json()
    out["chat"] = r["choices"][0]["message"]["content"]
    out["chat_streamed"] = "".join(c["choices"][0]["delta"].get("content") or ""
                                   for c in _sse(server, "/v1/chat/completions", chat) if c["choices"])
    return out


def test_same_greedy_answers_as_the_engine_on_a_thread(server, thread_server):
    got, want = _answers(server), _answers(thread_server)
    assert got == want
    assert [t for t, _ in got["completions"]] == got["completions_streamed"] and got["chat"] == got["chat_streamed"]


def test_sigterm_drains_and_the_engine_process_ends(server):
    """Last of the module's server: the hardening module's drain test, then no engine process is left."""
    engine_pid = engine_process_pid(server.proc.pid)
    hardening.test_sigterm_drains_then_ends_every_request_cleanly(
        (server.proc, server.url, pathlib.Path(server.log_path)))
    assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    assert not _alive(engine_pid)


def test_killed_engine_process_ends_the_server_with_its_cause(tmp_path_factory, tiny_model_factory):
    tiny = tiny_model_factory("llama")  # starts faster than the bundled model; prompts are token ids
    server = next(gen := launch_server(tmp_path_factory, [tiny, "--skip-tokenizer-init", "--engine-process"],
                                       max_model_len=512))
    try:
        engine_pid = engine_process_pid(server.proc.pid)
        events: list[str] = []
        first = threading.Event()

        def stream():
            body = {"model": server.model, "prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, json=body,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60), "the stream never started"
        killed_at = time.monotonic()
        os.kill(engine_pid, signal.SIGKILL)
        code = server.proc.wait(DIED_WITHIN_S + 30)
        exited = time.monotonic() - killed_at
        reader.join(30)
        assert code == 1 and exited < DIED_WITHIN_S, (code, exited)
        log = pathlib.Path(server.log_path).read_text()
        assert f"the engine died: the engine process (pid {engine_pid}) was killed by signal SIGKILL" in log, log[-2000:]
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "SIGKILL" in error["message"]
    finally:
        gen.close()
