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


def test_block_tables_rows_stay_zero_padded_through_reuse_and_growth():
    """The persistent rows a step gathers its block tables from: each request's row holds its
    table and zeros after it, also when a row is reused by a shorter table and after the array
    grows in rows (more live requests) and in width (longer tables)."""
    states = RequestStates(width=4)
    rng = np.random.default_rng(1)
    expect: dict[str, list[int]] = {}
    for rnd in range(60):
        drop = [rid for rid in expect if rng.random() < 0.3]
        new = [NewRequest(f"r{rnd}-{i}", [1], SamplingParams(), rng.integers(1, 10_000, int(rng.integers(0, 9))).tolist())
               for i in range(int(rng.integers(0, 6)))]
        grow = {rid: rng.integers(1, 10_000, int(rng.integers(1, 4))).tolist() for rid in expect
                if rid not in drop and rng.random() < 0.5}
        states.apply(step(finished_req_ids=drop, new_requests=new, new_block_ids=grow))
        for rid in drop:
            del expect[rid]
        for rid, blocks in grow.items():
            expect[rid] = expect[rid] + blocks
        expect.update({n.req_id: list(n.block_ids) for n in new})
        assert set(states) == set(expect)
        if not expect:
            continue
        ids = list(expect)
        width = max(len(b) for b in expect.values())
        out = np.full((len(ids), width), -1, dtype=np.int32)
        states.tables.gather(np.array([states[r].row for r in ids]), width, out)
        for i, rid in enumerate(ids):
            assert out[i].tolist() == expect[rid] + [0] * (width - len(expect[rid]))
    assert max(len(b) for b in expect.values()) > 4 or states.tables.array.shape[1] >= 4
    assert len({states[r].row for r in states}) == len(states)  # no two live requests share a row
