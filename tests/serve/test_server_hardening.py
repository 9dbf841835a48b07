"""One `nanovllm serve` process (bundled model, the model's full 8192-token context) held to the
server limits: huge prompts never stall /health, read timeouts and the connection limit close
what hostile clients leave open, the key stays out of `ps`, and SIGTERM drains cleanly.
The drain test stops the server, so it runs last."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import free_port

KEY = "sk-hardening-test"
READ_TIMEOUT_S = 2
KEEP_ALIVE_S = 1
CONNECTION_LIMIT = 12
SHUTDOWN_TIMEOUT_S = 3
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hard")
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "NANOVLLM_API_KEY"}
    cmd = [sys.executable, "-m", "nanovllm.cli.main", "serve", "--port", str(port), "--api-key-file", str(key_file),
           "--max-num-seqs", "8", "--num-kv-blocks", "256", "--read-timeout", str(READ_TIMEOUT_S),
           "--timeout-keep-alive", str(KEEP_ALIVE_S), "--limit-concurrency", str(CONNECTION_LIMIT),
           "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


HEADERS = {"Authorization": f"Bearer {KEY}"}


def _text(chars: int) -> str:
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches ".split()
    out, n, i = [], 0, 0
    while n < chars:
        out.append(words[i % len(words)])
        n += len(out[-1]) + 1
        i += 1
    return " ".join(out)[:chars]


def test_key_file_keeps_the_key_out_of_ps(hard):
    proc, url, _ = hard
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().decode()
    assert KEY not in cmdline
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(url + "/v1/models", headers=HEADERS, timeout=30).status_code == 200


def test_health_keeps_pace_while_huge_prompts_are_tokenized(hard):
    """Prompts just under the character bound take seconds to tokenize; /health must not wait."""
    _, url, _ = hard
    limit = 81 * 8192  # the bundled tokenizer's longest token x max_model_len (checked below)
    prompt = _text(limit - 1000)
    results: list = []

    def tokenize():
        r = httpx.post(url + "/tokenize", headers=HEADERS, json={"prompt": prompt}, timeout=300)
        results.append(r)

    workers = [threading.Thread(target=tokenize) for _ in range(2)]
    start = time.monotonic()
    for w in workers:
        w.start()
    health = []
    while any(w.is_alive() for w in workers):
        t = time.monotonic()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        health.append(time.monotonic() - t)
        time.sleep(0.05)
    busy = time.monotonic() - start
    for w in workers:
        w.join()
    assert all(r.status_code == 200 for r in results), results[0].text
    assert results[0].json()["count"] > 8192  # really a huge prompt (longer than the context)
    assert len(health) >= 5, f"tokenizing took only {busy:.2f} s: not a test of the event loop"
    # Tokenized on the event loop, one /health would wait for a whole prompt (>= busy / 2).
    # Threads only share the CPU with it: on 2 cores busy with other jobs that still costs up to
    # about a quarter of the tokenizing time; a third keeps clear of the blocked loop's half.
    assert max(health) < min(1.0, busy / 3), f"/health took up to {max(health):.2f} s while prompts were " \
                                              f"tokenized for {busy:.1f} s"


def test_prompt_longer_than_any_that_fits_is_refused_without_tokenizing(hard):
    _, url, _ = hard
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", headers=HEADERS, json={"prompt": _text(9_000_000), "max_tokens": 1},
                   timeout=60)
    took = time.monotonic() - start
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "9000000 characters" in r.json()["error"]["message"] and f"({81 * 8192})" in r.json()["error"]["message"]
    assert took < 5, f"refusing took {took:.1f} s"  # tokenizing 9 MB takes ~20 s here
    r = httpx.post(url + "/v1/chat/completions", headers=HEADERS,
                   json={"messages": [{"role": "user", "content": _text(700_000)}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection (fails if it stays open)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {seconds} s (got {data[:80]!r})")


def test_read_timeouts_close_half_open_connections(hard):
    _, url, _ = hard
    port = int(url.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port))
    partial_head = socket.create_connection(("127.0.0.1", port))
    partial_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    partial_body = socket.create_connection(("127.0.0.1", port))
    partial_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    start = time.monotonic()
    assert _closed_within(silent, READ_TIMEOUT_S + 3) == b""
    assert _closed_within(partial_head, READ_TIMEOUT_S + 3) == b""
    answer = _closed_within(partial_body, READ_TIMEOUT_S + 3 + KEEP_ALIVE_S)
    assert time.monotonic() - start < READ_TIMEOUT_S + 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    err = json.loads(body)["error"]
    assert err["code"] == 408 and "did not arrive within 2 s" in err["message"]
    # an idle keep-alive connection goes after --timeout-keep-alive
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in _closed_within(idle, KEEP_ALIVE_S + 3)
    for s in (silent, partial_head, partial_body, idle):
        s.close()


def test_connection_limit(hard):
    _, url, _ = hard
    port = int(url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTION_LIMIT)]
    time.sleep(0.3)  # let the server register them (well inside the read timeout)
    try:
        assert httpx.get(url + "/health", timeout=30).status_code == 503
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline


def test_empty_api_key_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = [sys.executable, "-m", "nanovllm.cli.main", "serve", "--port", "1"]
    env = {k: v for k, v in os.environ.items() if k != "NANOVLLM_API_KEY"}
    for extra, words in [(["--api-key", ""], "--api-key is empty"),
                         (["--api-key-file", str(empty)], "the first line is empty"),
                         (["--api-key-file", str(tmp_path / "nope")], "cannot read it")]:
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, env=dict(env, NANOVLLM_API_KEY=" "))
    assert r.returncode == 2 and "NANOVLLM_API_KEY is set but empty" in r.stderr, r.stderr


def _metrics(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("nanovllm:") and "{" in line and 'le="' not in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


def test_sigterm_drains_then_ends_every_request_cleanly(hard):
    """Last: stops the server. A short request finishes; long ones end with an error event + [DONE]
    (stream) or a 503 (non-streamed) once --shutdown-timeout has passed."""
    proc, url, log_path = hard
    long = {"prompt": "Count from one to one thousand:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    events: list[str] = []
    plain: list = []

    def stream():
        with httpx.stream("POST", url + "/v1/completions", headers=HEADERS, json=dict(long, stream=True),
                          timeout=120) as r:
            events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

    def non_streamed(body, out):
        out.append(httpx.post(url + "/v1/completions", headers=HEADERS, json=body, timeout=120))

    threads = [threading.Thread(target=stream), threading.Thread(target=non_streamed, args=(long, plain))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while _metrics(url).get("nanovllm:num_requests_running", 0) < 2:
        assert time.monotonic() < deadline, "the long requests did not start"
        time.sleep(0.1)
    short: list = []
    short_thread = threading.Thread(target=non_streamed, args=(dict(long, max_tokens=8), short))
    short_thread.start()
    while _metrics(url).get("nanovllm:num_requests_running", 0) < 3:
        assert time.monotonic() < deadline, "the short request did not start"
        time.sleep(0.02)
    sigterm_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in (*threads, short_thread):
        t.join(60)
    proc.wait(30)
    exited = time.monotonic() - sigterm_at

    assert short[0].status_code == 200, short[0].text  # finished within the drain
    assert short[0].json()["choices"][0]["finish_reason"] == "length"
    assert plain[0].status_code == 503, plain[0].text
    assert "did not finish within the 3 s drain" in plain[0].json()["error"]["message"]
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "did not finish within the 3 s drain" in error["message"]
    assert len(events) > 3  # tokens were streamed before the drain ended it
    assert SHUTDOWN_TIMEOUT_S <= exited < SHUTDOWN_TIMEOUT_S + 10, f"exited {exited:.1f} s after SIGTERM"
    assert "draining 3 running" in log_path.read_text()
