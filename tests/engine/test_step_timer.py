"""NANOVLLM_STEP_TIMING=1 accounts every step's wall time to its phases."""

import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.step_timer import HOST_PHASES, StepTimer


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_timer_covers_the_step(tiny_model_factory, monkeypatch, async_scheduling):
    monkeypatch.setenv("NANOVLLM_STEP_TIMING", "1")
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64,
              async_scheduling=async_scheduling)
    engine = llm.engine
    timer = engine.step_timer
    assert timer is not None
    for i in range(3):
        engine.add_request(str(i), {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=6, ignore_eos=True))
    t0 = time.perf_counter()
    calls = 0
    while engine.has_unfinished_requests():
        engine.step()
        calls += 1
    wall = time.perf_counter() - t0
    # sync: one step per token; async: the last call only resolves the step in flight
    assert calls == (7 if async_scheduling else 6)
    assert timer.steps == calls
    unmarked = set() if async_scheduling else {"launch_rest"}  # the synchronous loop launches and resolves at once
    assert all(v > 0 for k, v in timer.totals.items() if k not in unmarked), timer.totals
    assert all(timer.totals[k] == 0 for k in unmarked)
    assert sum(timer.totals.values()) <= wall
    assert "forward" in timer.summary() and "detokenize" in timer.summary()
    assert set(HOST_PHASES) < set(StepTimer.PHASES)
    timer.reset()
    assert timer.steps == 0 and not any(timer.totals.values())
