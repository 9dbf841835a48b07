"""The examples in examples/ run against the shared server (LangChain's only when it is installed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def _run(server, name: str) -> str:
    cmd = [sys.executable, os.path.join(EXAMPLES, name), "--base-url", server.v1, "--max-tokens", "8"]
    env = dict(os.environ, NANOVLLM_API_KEY=server.api_key)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_openai_client_example(server):
    stdout = _run(server, "openai_client.py")
    assert f"model: {server.model}" in stdout
    assert "completion: '" in stdout and "chat: " in stdout
    assert "usage: " in stdout and "completion tokens" in stdout


def test_langchain_example(server):
    pytest.importorskip("langchain_openai")
    stdout = _run(server, "langchain_chat.py")
    assert "answer: '" in stdout and "stream: " in stdout
