"""NANOVLLM_STEP_TIMING=1 accounts every step's wall time to its phases."""

import time

from nanovllm import LLM, SamplingParams


def test_step_timer_covers_the_step(tiny_model_factory, monkeypatch):
    monkeypatch.setenv("NANOVLLM_STEP_TIMING", "1")
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    timer = llm.engine.step_timer
    assert timer is not None
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    assert timer.steps == 6
    assert all(v > 0 for v in timer.totals.values())
    assert sum(timer.totals.values()) <= wall
    assert "forward_sample_sync" in timer.summary()
