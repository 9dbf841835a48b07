"""All prompts of one request reach the engine together: after the first step that runs any of
them, all of them are scheduled (checked on the engine's own step, not by timing)."""

from __future__ import annotations

import asyncio
import time

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncLLMEngine
from nanovllm.serve.completions import OpenAIServingCompletion
from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.protocol import CompletionRequest

NUM_PROMPTS = 24


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    eng = AsyncLLMEngine.from_config(EngineConfig(
        model=tiny_model_factory("qwen3"), device="cpu", skip_tokenizer_init=True, max_model_len=128,
        max_num_seqs=32))
    yield eng
    eng.shutdown()


@pytest.fixture
def scheduled_per_step(engine):
    """Wrap the engine's step (called on the engine thread): record which requests each step scheduled."""
    inner = engine.engine
    original = inner.scheduler.schedule
    record: list[set[str]] = []

    def schedule():
        out = original()
        if not out.is_empty:
            record.append({item.request.parent_id for item in out.scheduled})
        return out

    inner.scheduler.schedule = schedule
    yield record
    inner.scheduler.schedule = original


def test_all_prompts_of_a_completion_request_are_scheduled_in_its_first_step(engine, scheduled_per_step):
    serving = OpenAIServingCompletion(engine, "tiny")
    prompts = [[1 + i, 2, 3, 4] for i in range(NUM_PROMPTS)]
    req = CompletionRequest(prompt=prompts, max_tokens=3, ignore_eos=True, temperature=0)
    response = asyncio.run(serving.create(req))
    assert len(response.choices) == NUM_PROMPTS and all(len(c.token_ids or []) in (0, 3) for c in response.choices)
    assert response.usage.completion_tokens == 3 * NUM_PROMPTS
    first = scheduled_per_step[0]
    assert len(first) == NUM_PROMPTS, f"first step scheduled {len(first)} of {NUM_PROMPTS} prompts"
    assert len(scheduled_per_step) == 3  # prefill + 2 decodes, all prompts together


def test_add_requests_is_all_or_nothing(engine):
    async def main():
        good = ([1, 2, 3], SamplingParams(max_tokens=2), None)
        bad = ([10**6], SamplingParams(max_tokens=2), None)
        with pytest.raises(ValueError, match="vocabulary") as info:
            await engine.add_requests([good, good, bad])
        assert info.value.param == "prompt"

    asyncio.run(main())
    stats = engine.stats()
    end = time.monotonic() + 30
    while (stats["num_running"] or stats["num_waiting"] or stats["kv_cache_usage"]) and time.monotonic() < end:
        time.sleep(0.02)
        stats = engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0
