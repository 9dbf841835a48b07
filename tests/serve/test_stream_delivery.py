"""Delivery of streamed outputs: one wake-up per step for all streams; lagging streams coalesce without loss."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.config import EngineConfig
from nanovllm.engine import async_engine as ae
from nanovllm.engine.async_engine import AsyncLLMEngine
from nanovllm.engine.output_merge import merge_delta_outputs
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
NUM_STREAMS = 6


@pytest.fixture(scope="module")
def engines(tiny_model_factory):
    path = tiny_model_factory("llama")
    made = {c: AsyncLLMEngine.from_config(EngineConfig(model=path, device="cpu", skip_tokenizer_init=True,
                                                       max_model_len=128), coalesce_outputs=c)
            for c in (False, True)}
    yield made
    for e in made.values():
        e.shutdown()


def prompts():
    return [[3 + i, 7, 11 + 2 * i, 5] for i in range(NUM_STREAMS)]


async def consume(engine, prompt, delay_s):
    outs = []
    stream = await engine.add_request(prompt, PARAMS)
    async for out in stream:
        outs.append(out)
        if delay_s:
            await asyncio.sleep(delay_s)  # a consumer slower than the engine: outputs pile up
    return outs


def test_one_wake_up_per_step_for_all_streams(engines, monkeypatch):
    engine = engines[False]
    calls = {"deliver": 0, "steps_with_outputs": 0}
    real_call, real_step = ae._call, engine.engine.step

    def counting_call(loop, fn, *args):
        if fn is ae._deliver:
            calls["deliver"] += 1
        return real_call(loop, fn, *args)

    def counting_step():
        outs = real_step()
        calls["steps_with_outputs"] += bool(outs)
        return outs

    monkeypatch.setattr(ae, "_call", counting_call)
    monkeypatch.setattr(engine.engine, "step", counting_step)

    async def main():
        return await asyncio.gather(*(consume(engine, p, 0) for p in prompts()))

    results = asyncio.run(main())
    assert all(sum(len(o.outputs[0].token_ids) for o in outs) == 24 for outs in results)
    assert calls["steps_with_outputs"] >= 24
    assert calls["deliver"] == calls["steps_with_outputs"]  # not one per stream per step


def test_lagging_streams_coalesce_without_losing_or_reordering_tokens(engines):
    async def run(engine, delay):
        return await asyncio.gather(*(consume(engine, p, delay) for p in prompts()))

    reference = asyncio.run(run(engines[False], 0))
    lagging = asyncio.run(run(engines[True], 0.03))
    for ref, got in zip(reference, lagging):
        ref_ids = [t for o in ref for t in o.outputs[0].token_ids]
        got_ids = [t for o in got for t in o.outputs[0].token_ids]
        assert got_ids == ref_ids and len(got_ids) == 24  # greedy: the same tokens, in order
        assert got[-1].finished and got[-1].outputs[0].finish_reason == "length"
        assert not any(o.finished for o in got[:-1])
    assert sum(len(outs) for outs in lagging) < sum(len(outs) for outs in reference)  # fewer, larger chunks


def test_without_coalescing_each_step_is_its_own_output(engines):
    outs = asyncio.run(consume(engines[False], [1, 2, 3], 0.02))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1] * 24


def _lp(token):
    return {token: Logprob(-0.5, 1), token + 1: Logprob(-1.5, 2)}


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 50), min_size=2, max_size=30), n=st.integers(1, 3), data=st.data())
def test_merging_any_split_gives_the_concatenation(tokens, n, data):
    """Deltas of n completions cut at random points, folded pairwise: the same text, ids, logprobs, order."""
    cuts = sorted(data.draw(st.sets(st.integers(1, len(tokens) - 1), max_size=len(tokens) - 1)))
    bounds = [0] + cuts + [len(tokens)]
    deltas = []
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        last = k == len(bounds) - 2
        deltas.append(RequestOutput(
            "r", None, [1, 2], finished=last, outputs=[
                CompletionOutput(i, "".join(f"<{t + i}>" for t in tokens[lo:hi]), [t + i for t in tokens[lo:hi]],
                                 cumulative_logprob=-float(hi), logprobs=[_lp(t + i) for t in tokens[lo:hi]],
                                 finish_reason="length" if last else None)
                for i in range(n)]))
    merged = deltas[0]
    for d in deltas[1:]:
        merged = merge_delta_outputs(merged, d)
    assert merged.finished
    for i, c in enumerate(merged.outputs):
        assert c.index == i
        assert c.token_ids == [t + i for t in tokens]
        assert c.text == "".join(f"<{t + i}>" for t in tokens)
        assert c.logprobs == [_lp(t + i) for t in tokens]
        assert c.finish_reason == "length" and c.cumulative_logprob == -float(len(tokens))


def test_merging_outputs_of_different_requests_is_refused():
    a = RequestOutput("a", None, [1], [CompletionOutput(0, "x", [1])], False)
    b = RequestOutput("b", None, [1], [CompletionOutput(0, "y", [2])], False)
    with pytest.raises(ValueError, match="different requests"):
        merge_delta_outputs(a, b)


def test_coalesce_outputs_must_be_a_bool(tiny_model_factory):
    with pytest.raises(TypeError, match="coalesce_outputs"):
        AsyncLLMEngine(object(), coalesce_outputs="yes")
