"""The worker's request copies: block tables kept as lists and as int32 arrays, in step with each other."""

import numpy as np

from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import NewRequest, StepInput
from nanovllm.worker.request_states import MIN_BLOCK_CAPACITY, RequestStates


def step(**kw) -> StepInput:
    base = dict(req_ids=[], num_new_tokens=[], start_positions=[], needs_sample=[])
    return StepInput(**base, **kw)


def test_block_array_follows_the_appended_blocks_past_its_capacity():
    states = RequestStates()
    first = list(range(100, 100 + MIN_BLOCK_CAPACITY - 3))
    states.apply(step(new_requests=[NewRequest("a", [1, 2, 3], SamplingParams(), list(first)),
                                    NewRequest("b", [4], SamplingParams(), [])]))
    expect = {"a": list(first), "b": []}
    rng = np.random.default_rng(0)
    for _ in range(40):  # grows both tables several times over, one or a few blocks at a time
        new = {rid: rng.integers(0, 10_000, int(rng.integers(1, 6))).tolist() for rid in expect}
        states.apply(step(new_block_ids=new))
        for rid, blocks in new.items():
            expect[rid] += blocks
        for rid, blocks in expect.items():
            assert states[rid].block_ids == blocks
            arr = states[rid].block_array
            assert arr.dtype == np.int32 and arr.tolist() == blocks
    states.apply(step(finished_req_ids=["a"]))
    assert list(states) == ["b"]
