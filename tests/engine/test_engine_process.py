"""The engine process's parts: the output records, the engine loop (run here on a thread, with
pipes), start-up failures, and no engine process outliving the process that started it."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.engine_core_proc import EngineCoreLoop
from nanovllm.engine.engine_ipc import (METRIC_FIELDS, AbortRequests, AddRequest, Shutdown, StepBatch, decode_output,
                                        encode_outputs)
from nanovllm.engine.engine_process import EngineProcessClient
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nanovllm.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_output_records_round_trip():
    assert METRIC_FIELDS == tuple(f.name for f in dataclasses.fields(RequestMetrics))
    out = RequestOutput(
        "r1", "a prompt", [5, 6, 7],
        [CompletionOutput(0, " hi", [11], -0.5, [{11: Logprob(-0.5, 1, " hi")}], None, None),
         CompletionOutput(1, "!", [12, 2], None, None, "stop", 2)],
        True, prompt_logprobs=[None, {6: Logprob(-1.0, 2, "b")}], num_cached_tokens=3,
        metrics=RequestMetrics(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 3))
    [record] = encode_outputs([out])
    assert "a prompt" not in repr(record)  # the prompt stays in the server's process
    assert decode_output(record, out.prompt, out.prompt_token_ids) == out


@pytest.fixture
def loop(tiny_model_factory):
    """An EngineCoreLoop on a thread, driven through pipes as the server's process drives it."""
    engine = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), device="cpu", skip_tokenizer_init=True,
                                    max_model_len=256))
    cmd_r, cmd_w = multiprocessing.Pipe(duplex=False)
    res_r, res_w = multiprocessing.Pipe(duplex=False)
    core = EngineCoreLoop(engine, cmd_r, res_w)
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    yield engine, cmd_w, res_r
    cmd_w.send(Shutdown(10 ** 6))
    thread.join(30)
    assert not thread.is_alive()


def _add(seq: int, rid: str) -> AddRequest:
    return AddRequest(seq, rid, {"prompt": None, "prompt_token_ids": [1, 2, 3]}, LONG, time.monotonic())


def _next_batch(res_r, match) -> StepBatch:
    """The next StepBatch for which match(batch) is true."""
    deadline = time.monotonic() + 30
    while True:
        assert res_r.poll(max(0.0, deadline - time.monotonic())), "no batch"
        batch = res_r.recv()
        if match(batch):
            return batch


def test_a_failed_step_is_reported_and_waits_for_the_abort(loop, monkeypatch):
    engine, cmd_w, res_r = loop
    real_step, calls = engine.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom (injected)")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    cmd_w.send(_add(1, "a"))
    failed = _next_batch(res_r, lambda b: b.failure is not None)
    assert "boom" in failed.failure.error and failed.failure.request_ids == ["a"]
    time.sleep(0.3)
    assert calls["n"] == 3  # paused: no step until the server's verdict
    cmd_w.send(AbortRequests(2, ["a"]))
    idle = _next_batch(res_r, lambda b: b.applied == 2)
    assert idle.stats["num_running"] == 0 and idle.stats["kv_cache_usage"] == 0
    cmd_w.send(_add(3, "b"))  # steps again
    batch = _next_batch(res_r, lambda b: b.applied == 3 and b.outputs)
    assert batch.failure is None and batch.outputs[0][0] == "b" and calls["n"] > 3


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_start_up_failure_raises_the_engines_error_and_leaves_no_process():
    with pytest.raises(ValueError, match="not found"):
        EngineProcessClient(EngineConfig(model="/nonexistent/model-dir", device="cpu", engine_process=True))
    assert not multiprocessing.active_children()


def test_engine_process_exits_when_its_parent_is_killed(tiny_model_factory):
    script = textwrap.dedent(f"""
        import time
        from nanovllm.config import EngineConfig
        from nanovllm.engine.engine_process import EngineProcessClient
        client = EngineProcessClient(EngineConfig(model={tiny_model_factory("llama")!r}, device="cpu",
                                                  skip_tokenizer_init=True, max_model_len=256))
        print(client.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the engine process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_results_pipe_holds_many_steps():
    """The engine process must not block on a server that lags a few steps (Linux: F_SETPIPE_SZ)."""
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("no F_GETPIPE_SZ here")
    from nanovllm.engine.engine_process import RESULTS_PIPE_BYTES, _widen_pipe

    with open("/proc/sys/fs/pipe-max-size") as f:
        if int(f.read()) < RESULTS_PIPE_BYTES:
            pytest.skip("this system caps pipes below RESULTS_PIPE_BYTES (the default size is kept)")
    r, w = multiprocessing.get_context("spawn").Pipe(duplex=False)
    _widen_pipe(r)
    assert fcntl.fcntl(w.fileno(), fcntl.F_GETPIPE_SZ) == RESULTS_PIPE_BYTES
    r.close()
    w.close()


def test_killed_engine_process_fails_every_stream_and_calls_on_dead(tiny_model_factory):
    import asyncio

    from nanovllm.engine.async_engine import AsyncLLMEngine, EngineDeadError

    engine = AsyncLLMEngine.from_config(EngineConfig(model=tiny_model_factory("llama"), device="cpu",
                                                     skip_tokenizer_init=True, max_model_len=256, engine_process=True))
    dead = []
    engine.on_dead(dead.append)

    async def main():
        streams = [await engine.add_request([1, 2, 3 + i], LONG) for i in range(3)]
        for stream in streams:
            await stream.__anext__()
        os.kill(engine.engine.process.pid, signal.SIGKILL)
        errors = []
        for stream in streams:
            with pytest.raises(EngineDeadError) as info:
                async for _ in stream:
                    pass
            errors.append(str(info.value))
        with pytest.raises(EngineDeadError):
            await engine.add_request([1, 2], LONG)
        return errors

    try:
        started = time.monotonic()
        errors = asyncio.run(asyncio.wait_for(main(), 30))
        assert time.monotonic() - started < 10
        assert all("was killed by signal SIGKILL" in e for e in errors), errors
        deadline = time.monotonic() + 5  # the callbacks run on the engine thread right after the streams fail
        while not dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(dead) == 1 and "SIGKILL" in str(dead[0]) and not engine.is_running
    finally:
        engine.shutdown()
