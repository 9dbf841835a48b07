"""The worker owns its model: its choices stay on its own modules, and the step contract is plain data.

- Two engines in one process (different models) never see each other's kernel choices.
- A worker fed only pickled copies of each step (what a worker in another process would
  receive) produces exactly the outputs of the in-process one: n > 1 forks with block
  copies, penalties (token history on the worker), seeds, logprobs, prompt logprobs,
  preemption and recompute, async scheduling.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from nanovllm import LLM, SamplingParams, envs
from nanovllm.kernels import gemv
from nanovllm.layers.kernel_options import KernelOptions, configure_kernels
from nanovllm.layers.linear import Linear, gemv_rows, gemv_shape, set_gemv_rows
from nanovllm.step_io import StepInput, StepOutput
from nanovllm.worker.executor import Executor, InProcessExecutor

KW = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=96)


def greedy_tokens(llm, prompts, n=4):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.skipif(torch.cuda.is_available() and not envs.triton_interpret(),
                    reason="runs the skinny GEMM on CPU tensors: needs Triton's interpreter (CPU machines)")
@torch.inference_mode()
def test_two_engines_in_one_process_keep_their_own_kernel_choices(tiny_model_factory, monkeypatch):
    a = LLM(tiny_model_factory("llama"), pdl=False, fuse_gemv_prologues=False, **KW)
    b = LLM(tiny_model_factory("qwen3"), **KW)
    wa, wb = a.engine.executor.worker, b.engine.executor.worker
    assert wa.kernel_options == KernelOptions(pdl=False, fuse_gemv_prologues=False)
    assert wb.kernel_options == KernelOptions()
    assert all(m.kernel_options is wb.kernel_options for m in wb.model.modules() if hasattr(m, "kernel_options"))

    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9]}]
    before_b = greedy_tokens(b, prompts)
    before_a = greedy_tokens(a, prompts)

    calls = []
    original = gemv.skinny_gemm

    def spy(x, weight, bias=None, **kw):
        calls.append(tuple(weight.shape))
        return original(x, weight, bias, **kw)

    monkeypatch.setattr(gemv, "skinny_gemm", spy)
    # What a calibration would decide for engine a: its o_proj shape on the skinny GEMM (on
    # CPU through the Triton interpreter: the test hook), nothing for engine b.
    o_shape = gemv_shape(wa.model.model.layers[0].self_attn.o_proj)
    configure_kernels(wa.model, KernelOptions(pdl=False, fuse_gemv_prologues=False, gemv_on_cpu=True))
    set_gemv_rows(wa.model, {o_shape: 8})
    assert gemv_rows(wa.model) == {o_shape: 8} and gemv_rows(wb.model) == {}
    assert all(not m.kernel_options.gemv_on_cpu for m in wb.model.modules() if isinstance(m, Linear))

    assert greedy_tokens(b, prompts) == before_b
    assert calls == []  # b's Linears never dispatched to the kernel
    assert greedy_tokens(a, prompts) == before_a
    assert calls and set(calls) == {o_shape[:2]}


class PicklingExecutor(InProcessExecutor):
    """The in-process worker, but each step and output crosses a pickle boundary (as between
    processes); after each launch it checks that the worker's copy of every scheduled request
    mirrors the engine's: prompt, the output tokens known on the host, block table."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_steps = 0
        self.engine = None  # set by the test once the engine exists

    def launch(self, step: StepInput):
        self.num_steps += 1
        handle = super().launch(pickle.loads(pickle.dumps(step)))
        held = self.worker.runner.requests
        for rid in step.req_ids:
            ours, theirs = held[rid], self.engine.scheduler.requests[rid]
            assert ours.prompt_token_ids == theirs.prompt_token_ids
            assert ours.output_token_ids == theirs.output_token_ids, f"{rid}: token history out of date"
            assert ours.block_ids == self.engine.kv.blocks_of(rid), f"{rid}: block table out of date"
        return handle

    def resolve(self, handle) -> StepOutput:
        return pickle.loads(pickle.dumps(super().resolve(handle)))

    def execute(self, step: StepInput) -> StepOutput:
        return self.resolve(self.launch(step))


def outputs_summary(outs):
    rows = []
    for o in outs:
        plp = None if o.prompt_logprobs is None else [
            None if e is None else sorted((t, round(lp.logprob, 4)) for t, lp in e.items()) for e in o.prompt_logprobs]
        for c in o.outputs:
            lps = None if c.logprobs is None else [sorted((t, round(lp.logprob, 4)) for t, lp in e.items())
                                                   for e in c.logprobs]
            rows.append((o.request_id, c.index, c.token_ids, c.finish_reason, lps, plp))
    return rows


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_worker_fed_pickled_steps_gives_the_same_outputs(tiny_model_factory, monkeypatch, async_scheduling):
    path = tiny_model_factory("qwen3")
    g = torch.Generator().manual_seed(11)
    prompts = [{"prompt_token_ids": torch.randint(3, 1000, (k,), generator=g).tolist()} for k in (1, 7, 19, 33, 40)]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, seed=4, n=3, max_tokens=10, ignore_eos=True),  # fork + block copies
        SamplingParams(temperature=0.7, seed=5, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=12,
                       ignore_eos=True),  # penalties read the worker's token history
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0.8, top_k=20, seed=6, min_tokens=4, max_tokens=11),
    ]
    # A pool too small for all of them at once: preemption and recompute happen.
    kw = dict(KW, num_kv_blocks=14, block_size=4, max_num_batched_tokens=24, async_scheduling=async_scheduling)
    plain = LLM(path, **kw)
    expected = outputs_summary(plain.generate(prompts, params, use_tqdm=False))
    assert plain.engine.num_preemptions_total > 0, "the pool was meant to force preemption"

    monkeypatch.setattr(Executor, "create", staticmethod(PicklingExecutor))
    piped = LLM(path, **kw)
    executor = piped.engine.executor
    assert isinstance(executor, PicklingExecutor)
    executor.engine = piped.engine
    got = outputs_summary(piped.generate(prompts, params, use_tqdm=False))
    assert [r[1:] for r in got] == [r[1:] for r in expected]
    assert executor.num_steps > 0 and piped.engine.num_preemptions_total > 0
    assert piped.engine.kv.num_free_blocks == piped.engine.kv.num_blocks
    # every request the worker held is dropped once finished (delivered with the next step)
    piped.generate([{"prompt_token_ids": [5]}], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert set(executor.worker.runner.requests) <= {f"llm-{i}" for i in range(len(prompts), len(prompts) + 1)}


def test_cuda_graphs_only_with_triton_attention():
    """attention_backend='torch' on CUDA indexes sequences from the host, which graph capture
    refuses: the worker then runs eagerly instead of failing at start-up."""
    from nanovllm.layers import ops
    from nanovllm.layers.kernel_options import KernelOptions
    from nanovllm.worker.worker import triton_attention_on

    assert not triton_attention_on(KernelOptions(triton_attention=False))
    assert not triton_attention_on(KernelOptions(triton=False))
    assert triton_attention_on(KernelOptions()) == ops.triton_available()
