"""The bundled SmolLM2-135M-Instruct answers through the API and the CLI."""

import os
import subprocess
import sys

from nanovllm import SamplingParams

PROMPT = "The capital of France is"


def test_api_greedy_answer_contains_paris(bundled_llm):
    out = bundled_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.prompt == PROMPT
    assert out.prompt_token_ids == bundled_llm.tokenizer(PROMPT).input_ids
    assert out.finished and out.outputs[0].finish_reason in ("stop", "length")


def test_cli_generate_prints_paris():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanovllm.cli.main", "generate", PROMPT, "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_cli_help_explains_each_flag():
    proc = subprocess.run([sys.executable, "-m", "nanovllm.cli.main", "generate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--max-tokens", "--temperature", "--top-p", "--seed", "--device", "--dtype"):
        assert flag in proc.stdout


def test_cli_bad_value_is_an_error_message_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "nanovllm.cli.main", "generate", PROMPT, "--model", "/no/such/dir"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
