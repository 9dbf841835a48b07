"""ModelRunner.prepare_inputs builds a step's arrays over the whole batch at once: they must say,
token by token, what a per-request reading of the step says (mixed prefill chunks, decodes with
known and pending tokens, requests that do not sample, ragged block tables)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.step_io import NewRequest, StepInput

KW = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=512)


@pytest.fixture(scope="module")
def runner(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), **KW)
    return llm.engine.executor.worker.runner


def random_step(rng: np.random.Generator, runner, num_reqs: int, tag: str, decode_only: bool):
    """New requests with random histories and block tables, and a step over them; returns the
    step and, per request, (prompt + known outputs, blocks, start, n, samples, pending row)."""
    bs = runner.block_size
    free = rng.permutation(runner.num_kv_blocks).tolist()
    new, expect = [], []
    req_ids, num_new, starts, samples = [], [], [], []
    pending_rows = {}
    for i in range(num_reqs):
        rid = f"{tag}-{i}"
        prompt = rng.integers(3, 900, int(rng.integers(1, 60))).tolist()
        outputs = rng.integers(3, 900, int(rng.integers(0, 20))).tolist()
        known = len(prompt) + len(outputs)
        kind = "decode" if decode_only else rng.choice(["decode", "pending", "chunk"])
        if decode_only:
            kind = "pending" if rng.random() < 0.7 else "decode"
        if kind == "pending":  # the token at position `known` is on the device
            start, n = known, 1
            pending_rows[rid] = len(pending_rows)
        elif kind == "decode":
            start, n = known - 1, 1
        else:
            start = int(rng.integers(0, known))
            n = int(rng.integers(1, known - start + 1))
        end = start + n
        num_blocks = -(-end // bs) + int(rng.integers(0, 3))  # some tables hold a spare block
        blocks = [free.pop() for _ in range(num_blocks)]
        sample = bool(end >= known) if kind != "chunk" else bool(rng.random() < 0.5)
        new.append(NewRequest(rid, prompt, SamplingParams(), list(blocks), list(outputs)))
        req_ids.append(rid), num_new.append(n), starts.append(start), samples.append(sample)
        expect.append((prompt + outputs, blocks, start, n, sample, pending_rows.get(rid)))
    step = StepInput(req_ids=req_ids, num_new_tokens=num_new, start_positions=starts, needs_sample=samples,
                     new_requests=new, num_batched_tokens=sum(num_new))
    return step, expect, pending_rows


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("seed", range(4))
@torch.inference_mode()
def test_prepare_inputs_matches_a_per_token_reading(runner, seed, decode_only):
    rng = np.random.default_rng(seed)
    bs = runner.block_size
    step, expect, pending_rows = random_step(rng, runner, int(rng.integers(1, 24)), f"s{seed}{decode_only}",
                                             decode_only)
    last = torch.tensor(rng.integers(1000, 2000, max(1, len(pending_rows))), dtype=torch.int64)
    runner._last_sampled, runner._last_sampled_rows = last, dict(pending_rows)
    runner.requests.apply(step)
    try:
        inputs = runner.prepare_inputs(step)
    finally:
        runner.requests.apply(StepInput([], [], [], [], finished_req_ids=list(step.req_ids)))
    ids, pos, slots, qsl, lens, rows, num_outputs = [], [], [], [0], [], [], []
    max_blocks = max(len(e[1]) for e in expect)
    tables = np.zeros((len(expect), max_blocks), dtype=np.int32)
    for i, (tokens, blocks, start, n, sample, prow) in enumerate(expect):
        for p in range(start, start + n):
            ids.append(int(last[prow]) if prow is not None else tokens[p])
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
        tables[i, : len(blocks)] = blocks
        if sample:
            rows.append(qsl[-1] - 1)
            num_outputs.append(len(tokens) - len(step.new_requests[i].prompt_token_ids) + (prow is not None))
    ctx = inputs.ctx
    assert inputs.input_ids.tolist() == ids
    assert ctx.positions.tolist() == pos
    assert ctx.slot_mapping.tolist() == slots
    assert ctx.query_start_loc.tolist() == qsl
    assert ctx.seq_lens.tolist() == lens
    assert ctx.block_tables.tolist() == tables.tolist()
    assert ctx.max_query_len == max(e[3] for e in expect) and ctx.max_seq_len == max(lens)
    got_rows = list(range(len(ids))) if inputs.logits_indices is None else inputs.logits_indices.tolist()
    assert got_rows == rows
    assert [r.req_id for r in inputs.sample_requests] == [rid for rid, e in zip(step.req_ids, expect) if e[4]]
    assert inputs.num_output_tokens == num_outputs


def test_a_pending_token_without_a_sampled_row_is_an_error(runner):
    step = StepInput(req_ids=["lost"], num_new_tokens=[1], start_positions=[3], needs_sample=[True],
                     new_requests=[NewRequest("lost", [1, 2, 3], SamplingParams(), [7])], num_batched_tokens=1)
    runner._last_sampled_rows = {}
    runner.requests.apply(step)
    try:
        with pytest.raises(RuntimeError, match="pending token"):
            runner.prepare_inputs(step)
    finally:
        runner.requests.apply(StepInput([], [], [], [], finished_req_ids=["lost"]))
