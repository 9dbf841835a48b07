"""GPU engine: Triton path equals the torch reference path; CUDA graphs change nothing."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.gpu
NUM_TOKENS = 32


def prompts_for(name, seed=3):
    g = torch.Generator().manual_seed(seed)
    vocab = TINY_CONFIGS[name]["vocab_size"]
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in (1, 9, 33, 70)]


def greedy(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2"])
def test_gpu_triton_fp32_matches_cpu_reference(name, tiny_model_factory):
    path = tiny_model_factory(name)
    prompts = prompts_for(name)
    cpu = LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=256)
    gpu = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="float32", max_model_len=256,
              num_kv_blocks=256, max_num_seqs=8)
    assert greedy(gpu, prompts) == greedy(cpu, prompts)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_cuda_graphs_do_not_change_tokens(name, tiny_model_factory):
    path = tiny_model_factory(name)
    prompts = prompts_for(name, seed=4)
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=256,
              max_num_seqs=8)
    eager = LLM(path, enforce_eager=True, **kw)
    graphs = LLM(path, enforce_eager=False, **kw)
    assert graphs.engine.executor.info.cuda_graphs and not eager.engine.executor.info.cuda_graphs
    assert greedy(graphs, prompts) == greedy(eager, prompts)


def test_triton_attention_matches_torch_attention_in_bf16(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    prompts = prompts_for("qwen3", seed=5)
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=256,
              max_num_seqs=8, enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    a = LLM(path, attention_backend="triton", **kw).generate(prompts, params, use_tqdm=False)
    b = LLM(path, attention_backend="torch", **kw).generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        tok = x.outputs[0].token_ids[0]
        if tok == y.outputs[0].token_ids[0]:
            assert x.outputs[0].logprobs[0][tok].logprob == pytest.approx(y.outputs[0].logprobs[0][tok].logprob, abs=0.05)


def test_kv_cache_is_sized_from_free_memory(tiny_model_factory):
    path = tiny_model_factory("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cuda", gpu_memory_utilization=0.3, max_model_len=256,
              max_num_seqs=8, enforce_eager=True)
    free, total = torch.cuda.mem_get_info()
    cfg = llm.engine.hf_config  # K and V, every layer, fp32 (the tiny model's checkpoint dtype) or bf16
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_block = llm.engine.executor.info.kv_bytes_per_block
    assert per_block == 16 * per_token * {"float32": 4, "bfloat16": 2}[llm.engine.executor.info.dtype]
    kv_bytes = llm.engine.kv.num_blocks * per_block
    assert 0.2 * total < kv_bytes < 0.3 * total  # most of the 30% budget, never more


def test_async_scheduling_changes_no_token_on_gpu(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    prompts = prompts_for("qwen3", seed=6)
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=256,
              max_num_seqs=8)
    sync = LLM(path, async_scheduling=False, **kw)
    asyn = LLM(path, **kw)
    assert asyn.engine.async_scheduling, "async scheduling is the CUDA default"
    assert greedy(asyn, prompts) == greedy(sync, prompts)
    seeded = [SamplingParams(temperature=0.6, seed=s, max_tokens=NUM_TOKENS, ignore_eos=True) for s in range(4)]
    a = [o.outputs[0].token_ids for o in asyn.generate(prompts, seeded, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in sync.generate(prompts, seeded, use_tqdm=False)]
    assert a == b
    assert asyn.engine.kv.num_free_blocks == asyn.engine.kv.num_blocks


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_launching_a_step_never_waits_for_the_gpu(tiny_model_factory, temperature):
    """Async scheduling only overlaps if launch() queues work without a host<->device sync."""
    import warnings

    path = tiny_model_factory("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=256,
              num_kv_blocks=256, max_num_seqs=8)
    params = SamplingParams(temperature=temperature, max_tokens=NUM_TOKENS, ignore_eos=True)
    llm.generate(prompts_for("qwen3"), params, use_tqdm=False)  # warm-up: caches, autotuning
    runner = llm.engine.executor.worker.runner  # the in-process worker's step runner
    original = runner.launch
    syncs = []

    def watched_launch(step):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs.extend(f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                             if "called a synchronizing" in str(w.message))

    runner.launch = watched_launch
    llm.generate(prompts_for("qwen3", seed=8), params, use_tqdm=False)
    assert syncs == [], "launch() synchronized with the GPU:\n" + "\n".join(syncs)


def test_programmatic_dependent_launch_changes_no_token(tiny_model_factory):
    """The decode graphs with PDL launches (Hopper) give the tokens of plain launches."""
    from nanovllm.kernels import pdl

    if not pdl._device_supports_pdl(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability >= 9")
    path = tiny_model_factory("qwen3")
    prompts = prompts_for("qwen3", seed=7)
    # gemv="force": the skinny GEMM (weight prefetch before the wait) in the graphs
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=256,
              max_num_seqs=8, gemv="force")
    plain = greedy(LLM(path, pdl=False, **kw), prompts)
    assert greedy(LLM(path, pdl=True, **kw), prompts) == plain
