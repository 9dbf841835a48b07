"""A step whose rows carry the same SamplingParams as the step before reuses that step's
SamplingBatch, but only when the batch is a function of those params alone: min_tokens, seeds,
penalties and grammars read per-step state (token counts, histories, masks) and rebuild it."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.worker.sampling_batch import SamplingBatch

KW = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=96)


def build(params, outputs=None):
    outputs = outputs or [[1, 2]] * len(params)
    return SamplingBatch.build(params, [[3, 4]] * len(params), outputs, [0], 50, torch.device("cpu"))


@pytest.mark.parametrize("params, reusable", [
    (SamplingParams(temperature=0), True),
    (SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1), True),
    (SamplingParams(temperature=0.7, logit_bias={3: 2.0}, logprobs=2), True),
    (SamplingParams(temperature=0, seed=3), True),  # greedy rows ignore their seed
    (SamplingParams(temperature=0.7, seed=3), False),  # the seed's step is the output count
    (SamplingParams(min_tokens=4), False),  # EOS is banned until the count reaches it
    (SamplingParams(repetition_penalty=1.2), False),  # reads the token history
    (SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"])), False),  # per-step masks
])
def test_params_only_says_what_the_batch_depends_on(params, reusable):
    plain = SamplingParams(temperature=0.5)
    assert build([plain, params]).params_only is reusable
    assert build([params]).params_only is reusable


def test_same_rows_reuse_the_batch_and_keep_the_tokens(tiny_model_factory):
    """Steady decode: one SamplingBatch for every step with the same rows; the tokens are those of
    an engine that rebuilds it every step (seeded, so both draw the same noise)."""
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 10]}, {"prompt_token_ids": [11]}]
    llm = LLM(tiny_model_factory("llama"), **KW)
    runner = llm.engine.executor.worker.runner
    built, original = [], SamplingBatch.build

    def counting_build(*args, **kwargs):
        batch = original(*args, **kwargs)
        built.append(batch)
        return batch

    # greedy rows and a logit bias (params only); per-step rows (seeded) rebuild every step
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={7: 3.0})]
    SamplingBatch.build = staticmethod(counting_build)
    try:
        out = llm.generate(prompts[:2], params, use_tqdm=False)
        assert len(built) < 8 and runner._reused_batch is not None  # 8 steps, far fewer batches
        built.clear()
        seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=8, ignore_eos=True) for i in range(3)]
        got = llm.generate(prompts, seeded, use_tqdm=False)
        assert len(built) == 8 and runner._reused_batch is None
    finally:
        SamplingBatch.build = original
    # an engine that rebuilds the batch every step gives the same tokens
    def never_reused(*args, **kwargs):
        batch = original(*args, **kwargs)
        batch.params_only = False
        return batch

    fresh = LLM(tiny_model_factory("llama"), **KW)
    SamplingBatch.build = staticmethod(never_reused)
    try:
        ref = fresh.generate(prompts[:2], params, use_tqdm=False)
        ref_seeded = fresh.generate(prompts, seeded, use_tqdm=False)
    finally:
        SamplingBatch.build = original
    assert fresh.engine.executor.worker.runner._reused_batch is None
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref_seeded]
