"""`nanovllm serve -tp 2` (engine on a thread, or in its own process): the server's completions
equal the single-process engine's greedy tokens, and a killed worker brings the server down with
exit code 1 and the rank's name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tiny_models import TINY_CONFIGS

REPO = Path(__file__).resolve().parents[2]
NUM_TOKENS = 8
EXIT_DEADLINE_S = 10.0
STARTUP_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(server_pid: int) -> list[int]:
    """The server's spawned tensor-parallel workers (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_served_tokens_match_and_a_dead_worker_stops_the_server(tiny_model_factory, tmp_path, engine_process):
    path = tiny_model_factory("qwen3")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, TINY_CONFIGS["qwen3"]["vocab_size"], (n,), generator=g).tolist() for n in (3, 21)]
    single = LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=128, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in single.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                use_tqdm=False)]
    port = free_port()
    log_path = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "nanovllm.cli.main", "serve", path, "-tp", "2", "--device", "cpu", "--dtype",
           "float32", "--skip-tokenizer-init", "--max-model-len", "128", "--num-kv-blocks", "64", "--port", str(port),
           *(["--engine-process"] if engine_process else [])]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        for prompt, tokens in zip(prompts, expected):
            body = {"model": path, "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == tokens

        owner = proc.pid
        if engine_process:  # the workers are the engine process's children
            [owner] = worker_pids(proc.pid)
        workers = worker_pids(owner)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        rc = proc.wait(timeout=30)
        assert time.monotonic() - start < EXIT_DEADLINE_S
        assert rc == 1
        log = log_path.read_text()
        assert f"tensor-parallel worker rank 1 (pid {workers[0]}) was killed by signal SIGKILL" in log
        assert "nanovllm serve: the engine died" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
