"""Tensor parallelism through the front door, with real worker processes (CPU, gloo).

- LLM(tensor_parallel_size=2) gives the greedy tokens of the single-process engine (fp32)
  for a GQA Llama and for a Qwen2 with fewer KV heads than ranks (replicated);
- the multi-process executor at size 1 ("mp") gives the in-process engine's tokens;
- under torchrun (2 processes) rank 0 runs the engine and rank 1 a worker (Qwen3);
- a killed worker makes the engine raise a WorkerDiedError naming the rank within seconds,
  and every later call raises it too;
- sizes that cannot work are a ValueError before any process starts.

Spawning torch processes is slow on small CI machines: one engine per model, shared by the
tests of this module.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.worker.executor import MultiprocExecutor, WorkerDiedError
from tiny_models import TINY_CONFIGS

REPO = Path(__file__).resolve().parents[2]
KW = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=128, num_kv_blocks=64)
NUM_TOKENS = 8
KILL_DEADLINE_S = 10.0
TORCHRUN_TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def prompts_for(name: str, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = TINY_CONFIGS[name]["vocab_size"]
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in (1, 7, 40)]


def greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def single_llama(tiny_model_factory):
    return LLM(tiny_model_factory("llama"), **KW)


@pytest.fixture(scope="module")
def tp_llama(tiny_model_factory):
    # async scheduling (the CUDA default): each step is launched before the previous one's
    # tokens reach the host; rank 1 takes them from rank 0's broadcast on the device
    llm = LLM(tiny_model_factory("llama"), tensor_parallel_size=2, async_scheduling=True, **KW)
    yield llm
    llm.engine.shutdown()


def test_two_ranks_give_the_single_process_tokens(tp_llama, single_llama):
    assert isinstance(tp_llama.engine.executor, MultiprocExecutor) and tp_llama.engine.async_scheduling
    assert tp_llama.engine.executor.info.tensor_parallel_size == 2
    prompts = prompts_for("llama")
    assert greedy(tp_llama, prompts) == greedy(single_llama, prompts)
    # logprobs come from rank 0's gathered logits over the whole vocabulary
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    a = tp_llama.generate(prompts[1:2], params, use_tqdm=False)[0].outputs[0]
    b = single_llama.generate(prompts[1:2], params, use_tqdm=False)[0].outputs[0]
    for la, lb in zip(a.logprobs, b.logprobs):
        assert set(la) == set(lb)
        assert all(la[t].logprob == pytest.approx(lb[t].logprob, abs=2e-4) for t in la)


def test_multiprocess_executor_at_size_one_gives_the_in_process_tokens(tiny_model_factory, single_llama):
    llm = LLM(tiny_model_factory("llama"), distributed_executor_backend="mp", **KW)
    try:
        assert isinstance(llm.engine.executor, MultiprocExecutor) and llm.engine.executor.procs is None
        prompts = prompts_for("llama", seed=1)
        assert greedy(llm, prompts) == greedy(single_llama, prompts)
    finally:
        llm.engine.shutdown()


def test_replicated_kv_heads_and_a_killed_worker(tiny_model_factory):
    """Qwen2's one KV head is replicated on both ranks; then rank 1 is killed mid-generation."""
    path = tiny_model_factory("qwen2")
    prompts = prompts_for("qwen2")
    expected = greedy(LLM(path, **KW), prompts)
    llm = LLM(path, tensor_parallel_size=2, **KW)
    try:
        assert greedy(llm, prompts) == expected
        executor = llm.engine.executor
        pid = executor.procs.pids[1]
        params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
        for i, p in enumerate(prompts):
            llm.engine.add_request(f"long-{i}", p, params)
        llm.engine.step()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=rf"rank 1 \(pid {pid}\) was killed by signal SIGKILL"):
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        assert time.monotonic() - start < KILL_DEADLINE_S
        assert executor.failure is not None
        with pytest.raises(WorkerDiedError, match="rank 1"):  # the engine stays dead, and says why
            llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert not any(p.pid == pid for p in multiprocessing.active_children())


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensor_parallel_size=3), "does not divide the model's 4 attention heads"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "needs one per rank"),
    (dict(tensor_parallel_size=0), "positive"),
    (dict(distributed_executor_backend="ray"), "use 'uni'"),
    (dict(tensor_parallel_size=2, kv_cache_dtype="fp8"), "kv_cache_dtype='fp8' is not available with tensor_par"),
    (dict(tensor_parallel_size=2, quantization="int4"), "quantization='int4' is not available with tensor_par"),
])
def test_impossible_sizes_are_refused_before_any_process_starts(tiny_model_factory, kwargs, match):
    path = tiny_model_factory("llama")
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match=match):
        LLM(path, **KW, **kwargs)
    assert {p.pid for p in multiprocessing.active_children()} <= before  # no worker was spawned


def test_a_family_without_parallel_layers_is_refused_at_size_two(tiny_model_factory, monkeypatch):
    """A model class that does not declare `supports_tensor_parallel` would load full-size
    layers on every rank: refused before any process starts."""
    from nanovllm.models import registry

    class Unsplit(registry.MODEL_REGISTRY["LlamaForCausalLM"]):
        supports_tensor_parallel = False

    monkeypatch.setitem(registry.MODEL_REGISTRY, "LlamaForCausalLM", Unsplit)
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match="Unsplit cannot be split over ranks yet: run it with tensor_parallel_size=1"):
        LLM(tiny_model_factory("llama"), tensor_parallel_size=2, **KW)
    assert {p.pid for p in multiprocessing.active_children()} <= before


@pytest.mark.parametrize("device,world,torchrun,match", [
    ("cuda", 2, None, "tensor_parallel_size=2 exceeds the 1 visible GPU"),
    ("cuda:0", 2, None, "names one GPU but tensor_parallel_size=2"),
    ("cuda", 2, (1, 3, 2), "LOCAL_RANK=3 but this host sees 1 GPU"),
    ("cuda", 2, (0, 0, 4), r"torchrun started 4 processes \(WORLD_SIZE\) but tensor_parallel_size=2"),
])
def test_gpu_layouts_that_cannot_work_are_refused(tiny_model_factory, monkeypatch, device, world, torchrun, match):
    """The GPU checks, on a machine made to look like it has one GPU (they read only counts)."""
    from nanovllm.config import EngineConfig
    from nanovllm.envs import TorchrunEnv
    from nanovllm.worker.parallel import validate_parallel_config
    from transformers import AutoConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = tiny_model_factory("llama")
    config = EngineConfig(model=path, device=device, tensor_parallel_size=world)
    env = TorchrunEnv(*torchrun, "127.0.0.1", 29500) if torchrun else None
    with pytest.raises(ValueError, match=match):
        validate_parallel_config(config, AutoConfig.from_pretrained(path), env)
    validate_parallel_config(EngineConfig(model=path, device="cuda"), AutoConfig.from_pretrained(path), None)  # fits


def test_more_cpu_processes_than_cores_are_refused(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(ValueError, match="exceed the 1 CPU cores"):
        LLM(tiny_model_factory("llama"), tensor_parallel_size=2, **KW)


TORCHRUN_SCRIPT = """
import json, sys
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[2]))  # ranks > 0 stay here, then exit
outs = llm.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0, max_tokens={n}, ignore_eos=True),
                    use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_launch_runs_the_engine_on_rank_0(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3")
    prompts = prompts_for("qwen3")
    expected = greedy(LLM(path, **KW), prompts)
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT.format(n=NUM_TOKENS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), path, json.dumps(KW), json.dumps(prompts)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TORCHRUN_TIMEOUT_S)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1, out.stdout[-3000:]  # only rank 0 returns from LLM(...)
    assert json.loads(lines[0].split(" ", 1)[1]) == expected


def test_a_dead_worker_is_described_by_rank_pid_and_reason():
    from nanovllm.worker.worker_procs import describe_death

    killed = describe_death(1, 42, -signal.SIGKILL, None)
    assert killed == "tensor-parallel worker rank 1 (pid 42) was killed by signal SIGKILL"
    report = "ValueError: bad shard\nTraceback (most recent call last):\n  ...\nValueError: bad shard\n"
    failed = describe_death(3, 7, 1, report)
    assert failed == "tensor-parallel worker rank 3 (pid 7) exited with code 1: ValueError: bad shard"
    silent = describe_death(2, 9, 1, None)  # e.g. died while its interpreter started
    assert silent == "tensor-parallel worker rank 2 (pid 9) exited with code 1 before reporting an error " \
                     "(its own output above says why)"


def test_ctrl_c_during_a_launch_is_delivered_after_it():
    """A KeyboardInterrupt never lands between rank 0's publish and its own launch."""
    from nanovllm.worker.executor import _SigintDeferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _SigintDeferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has been handled (held) by now
            done.append("launch finished")
    assert done == ["launch finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


CTRL_C_SCRIPT = """
import json, sys
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[2]))
print("READY", json.dumps(list(llm.engine.executor.procs.pids.values())), flush=True)
params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
while True:
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, params, use_tqdm=False)
"""


def test_ctrl_c_stops_the_engine_and_its_workers(tiny_model_factory, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the workers ignore it,
    the engine process raises KeyboardInterrupt, stops its workers on the way out and exits
    within seconds; no worker is left and none is reported as having died."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), tiny_model_factory("llama"), json.dumps(KW)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal's job
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line + proc.stderr.read()[-3000:]
        workers = json.loads(line.split(" ", 1)[1])
        time.sleep(1.0)  # mid-generation
        os.killpg(proc.pid, signal.SIGINT)
        start = time.monotonic()
        proc.wait(timeout=60)
        elapsed = time.monotonic() - start
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert elapsed < KILL_DEADLINE_S, err[-3000:]
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-3000:]
    assert "tensor-parallel worker rank" not in err, err[-3000:]  # a clean stop, not a death
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the engine"


def test_a_gptq_checkpoint_is_refused_at_size_two(tiny_model_factory, tmp_path):
    """Its quantized layers hold whole weights: refused before any process starts."""
    from prequant_checkpoints import write_prequantized

    qdir = str(tmp_path / "gptq")
    write_prequantized(tiny_model_factory("qwen2"), qdir, "gptq", group_size=32)
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match="GPTQ / AWQ.*cannot be split over tensor_parallel_size=2"):
        LLM(qdir, tensor_parallel_size=2, **KW)
    assert {p.pid for p in multiprocessing.active_children()} <= before
