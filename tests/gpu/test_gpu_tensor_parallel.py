"""GPU tensor parallelism: the multi-process executor at size 1 changes no token (Qwen3-0.6B
shape, bf16, CUDA graphs, async scheduling); with two GPUs, TP=2 gives TP=1's tokens and a
killed worker ends the engine within seconds (NCCL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.gpu

QWEN3_06B = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs", "qwen3-0.6b")
NUM_PROMPTS, NUM_TOKENS = 8, 32
KV_BLOCKS_TOL = 0.02


def prompts(vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()}
            for n in torch.randint(1, 200, (NUM_PROMPTS,), generator=g).tolist()]


def run(path: str, prompts_: list[dict], logprobs=None, **kw):
    llm = LLM(path, skip_tokenizer_init=True, **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=logprobs)
        outs = [o.outputs[0] for o in llm.generate(prompts_, params, use_tqdm=False)]
        info = llm.engine.executor.info
        return [o.token_ids for o in outs], [o.logprobs for o in outs], info
    finally:
        llm.engine.shutdown()  # frees the GPU for the next engine of this test


def test_multiprocess_executor_at_size_one_gives_the_in_process_tokens():
    kw = dict(load_format="dummy", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.4)
    ps = prompts(10000)
    uni, _, uni_info = run(QWEN3_06B, ps, distributed_executor_backend="uni", **kw)
    mp, _, mp_info = run(QWEN3_06B, ps, distributed_executor_backend="mp", **kw)
    assert mp_info.cuda_graphs and uni_info.cuda_graphs
    # The cache is sized from the device's free memory, which the one-rank process group's
    # buffers and what the first engine's process keeps (CUDA context, cuBLAS workspaces) lower
    # a little: the executor may not change the cache by more than KV_BLOCKS_TOL of it.
    assert abs(mp_info.num_kv_blocks - uni_info.num_kv_blocks) <= KV_BLOCKS_TOL * uni_info.num_kv_blocks, \
        (mp_info.num_kv_blocks, uni_info.num_kv_blocks)
    assert mp == uni


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2"])
def test_two_gpus_give_one_gpu_tokens(name, tiny_model_factory):
    """fp32 so that the all-reduce's other summation order cannot flip a greedy token; bf16
    logprobs within a bf16 tolerance, CUDA graphs (with the all-reduce captured) on."""
    path = tiny_model_factory(name)
    ps = prompts(TINY_CONFIGS[name]["vocab_size"], seed=1)
    kw = dict(device="cuda", max_model_len=256, num_kv_blocks=256, max_num_seqs=8)
    one, _, _ = run(path, ps, dtype="float32", **kw)
    two, _, info = run(path, ps, dtype="float32", tensor_parallel_size=2, **kw)
    assert info.tensor_parallel_size == 2 and info.cuda_graphs
    assert two == one
    one_bf16, lp1, _ = run(path, ps[:2], logprobs=0, dtype="bfloat16", **kw)
    two_bf16, lp2, _ = run(path, ps[:2], logprobs=0, dtype="bfloat16", tensor_parallel_size=2, **kw)
    first = [t[0] for t in one_bf16]
    assert [t[0] for t in two_bf16] == first  # the first token: no divergence compounded yet
    for a, b, tok in zip(lp1, lp2, first):
        assert b[0][tok].logprob == pytest.approx(a[0][tok].logprob, abs=0.05)


KILL_SCRIPT = """
import json, sys
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, skip_tokenizer_init=True, device="cuda", max_model_len=256,
          num_kv_blocks=256, max_num_seqs=8)
print("READY", json.dumps(list(llm.engine.executor.procs.pids.values())), flush=True)
params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
while True:
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, params, use_tqdm=False)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_killed_gpu_worker_ends_the_engine_within_seconds(tiny_model_factory, tmp_path):
    """NCCL does not fail a collective whose peer died: the watchdog aborts the communicators
    (WorkerDiedError) or, if the engine's call is still stuck, exits with code 1. Either way the
    engine process ends within seconds, naming the rank. In a subprocess: the exit path would
    end pytest itself."""
    script = tmp_path / "kill_gpu_worker.py"
    script.write_text(KILL_SCRIPT)
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), tiny_model_factory("qwen3")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line + proc.stderr.read()[-3000:]
        (worker,) = json.loads(line.split(" ", 1)[1])
        time.sleep(2.0)  # mid-generation, inside replayed graphs
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        proc.wait(timeout=60)
        elapsed = time.monotonic() - start
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert elapsed < 10.0, err[-3000:]
    assert proc.returncode == 1, err[-3000:]
    assert f"tensor-parallel worker rank 1 (pid {worker}) was killed by signal SIGKILL" in err
