"""One real `nanovllm serve` process (bundled model, loopback, API key from the env) shared by the serve tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import httpx
import pytest

API_KEY = "sk-nanovllm-test"
MAX_MODEL_LEN = 1024  # room for tool definitions in the prompt
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL_TEMPLATE = os.path.join(REPO, "examples", "tool_chat_template_chatml.jinja")
MAX_NUM_SEQS = 64
STARTUP_TIMEOUT_S = 300


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str
    max_model_len: int
    log_path: str
    proc: Optional[subprocess.Popen] = None

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    def metrics(self) -> dict[str, float]:
        """`nanovllm:*` samples of /metrics, keyed by name (labels dropped; one model)."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(nanovllm:[a-zA-Z0-9_:]+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
            if m and 'le="' not in (m.group(2) or ""):
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and the KV cache is empty; returns the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["nanovllm:num_requests_running"] == 0 and m["nanovllm:num_requests_waiting"] == 0
                    and m["nanovllm:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(tmp_path_factory, extra_args=(), api_key: str = API_KEY, max_model_len: int = MAX_MODEL_LEN):
    """Start the shared test server's command line (+ `extra_args`); yields the Server once healthy,
    stops it afterwards. The fixtures below (and test modules needing a variant) use it."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("serve") / "server.log")
    env = dict(os.environ, NANOVLLM_API_KEY=api_key)  # the key comes from the environment variable
    # tool calling as vLLM's tool examples start their server: a tool-aware template, Hermes parser
    cmd = [sys.executable, "-m", "nanovllm.cli.main", "serve", "--port", str(port),
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(MAX_NUM_SEQS),
           "--chat-template", TOOL_TEMPLATE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           *extra_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{open(log_path).read()[-4000:]}")
            time.sleep(0.5)
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30).json()
        yield Server(url, api_key, models["data"][0]["id"], max_model_len, log_path, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def thread_server(tmp_path_factory):
    """The server with its engine on a thread of the server's process (the default)."""
    yield from launch_server(tmp_path_factory)


@pytest.fixture(scope="session")
def server(thread_server):
    """The server most tests use (test_serve_engine_process.py points it at an engine-process server)."""
    return thread_server


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)
