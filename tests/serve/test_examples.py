"""The examples in examples/ run against the shared server (LangChain's only when it is installed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def _run(server, name: str, max_tokens: int = 8) -> str:
    cmd = [sys.executable, os.path.join(EXAMPLES, name), "--base-url", server.v1, "--max-tokens", str(max_tokens)]
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


def test_langchain_structured_output_and_tools_example(server):
    pytest.importorskip("langchain_openai")
    stdout = _run(server, "langchain_tools.py", max_tokens=96)
    lines = stdout.splitlines()
    for method in ("json_schema", "function_calling"):
        line = next(x for x in lines if x.startswith(f"structured ({method}): "))
        assert line.startswith(f"structured ({method}): Country(name=")  # parsed into the pydantic model
    calls = [x for x in lines if x.startswith("tool call: get_weather {")]
    assert calls and all("'city':" in x and ("'celsius'" in x or "'fahrenheit'" in x) for x in calls)
    assert any(x.startswith("answer: ") for x in lines)
