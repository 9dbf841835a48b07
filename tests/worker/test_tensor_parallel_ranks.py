"""Tensor-parallel workers give the single worker's results: the ranks run as threads of this
process over real gloo groups (no process start-up, so every model shape can be covered).

Each rank is a full `Worker` over its `TPGroup`: it builds its shard of the model, loads only
its slices of the checkpoint, and runs the same plain-data steps. Decode steps send no token
values (as under async scheduling), so every rank reads the tokens rank 0 sampled and
broadcast. Rank 0's outputs (greedy tokens, logprobs, prompt logprobs) must equal the single
worker's: tokens exactly, log-probabilities to float32 summation-order tolerance.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.kernels import gemv, reference
from nanovllm.layers.kernel_options import KernelOptions, configure_kernels
from nanovllm.layers.linear import Linear, gemv_shape, set_gemv_rows
from nanovllm.loading import model_info as model_info_lib
from nanovllm.loading.resolve import resolve_model
from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import NewRequest, StepInput
from nanovllm.worker.parallel import ParallelGroups
from nanovllm.worker.worker import Worker
from tiny_models import build_tiny_model

BLOCK_SIZE = 16
NUM_BLOCKS = 32
NUM_DECODE_STEPS = 6
LOGPROB_TOLERANCE = 2e-4  # float32, partial sums added in another order
PROMPTS = [[5, 6, 7, 8, 9], list(range(3, 40)), [11]]
THREAD_TIMEOUT_S = 240


def model_info(path: str, max_model_len: int = 128) -> model_info_lib.ModelInfo:
    source = resolve_model(path)
    hf_config = model_info_lib.load_hf_config(source)
    return model_info_lib.ModelInfo(source, hf_config, max_model_len, (2,))


def steps(num_decode: int = NUM_DECODE_STEPS) -> list[StepInput]:
    """A prefill of PROMPTS (logprobs and prompt logprobs asked) and greedy decode steps whose
    input tokens are the previous step's samples (not sent: read on each rank's device)."""
    params = SamplingParams(temperature=0, max_tokens=num_decode + 1, logprobs=3, prompt_logprobs=2)
    blocks_per_req = -(-(max(map(len, PROMPTS)) + num_decode + 1) // BLOCK_SIZE)
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    new = [NewRequest(rid, list(p), params, list(range(i * blocks_per_req, (i + 1) * blocks_per_req)))
           for i, (rid, p) in enumerate(zip(ids, PROMPTS))]
    out = [StepInput(ids, [len(p) for p in PROMPTS], [0] * len(PROMPTS), [True] * len(PROMPTS), new_requests=new,
                     num_batched_tokens=sum(map(len, PROMPTS)))]
    for k in range(num_decode):
        out.append(StepInput(ids, [1] * len(PROMPTS), [len(p) + k for p in PROMPTS], [True] * len(PROMPTS),
                             num_batched_tokens=len(PROMPTS)))
    return out


def run_steps(worker: Worker) -> list:
    """Launch each step before resolving the previous one (async scheduling's order)."""
    worker.initialize_cache(NUM_BLOCKS)
    results, in_flight = [], None
    for step in steps():
        handle = worker.launch(step)
        if in_flight is not None:
            results.append(worker.resolve(in_flight))
        in_flight = handle
    results.append(worker.resolve(in_flight))
    return results


def run_ranks(world: int, fn):
    """fn(ParallelGroups) on `world` threads, one per rank; returns the per-rank results."""
    store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False)
    results, errors = [None] * world, []

    def rank_main(rank: int) -> None:
        try:
            s = store if rank == 0 else dist.TCPStore("127.0.0.1", store.port, world, False)
            groups = ParallelGroups(s, rank, world, torch.device("cpu"), "test")
            try:
                results[rank] = fn(groups)
            finally:
                groups.shutdown()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(THREAD_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a rank did not finish (collectives out of step?)"
    if errors:
        raise errors[0]
    return results


def assert_same_outputs(single, parallel):
    for a, b in zip(single, parallel):
        assert a.sampled_token_ids == b.sampled_token_ids
        for rid, entry in a.logprobs.items():
            other = b.logprobs[rid]
            assert set(entry) == set(other)
            for tok, lp in entry.items():
                assert other[tok].logprob == pytest.approx(lp.logprob, abs=LOGPROB_TOLERANCE)
                assert other[tok].rank == lp.rank
        for rid, (first, entries) in a.prompt_logprobs.items():
            assert b.prompt_logprobs[rid][0] == first
            for e1, e2 in zip(entries, b.prompt_logprobs[rid][1]):
                if e1 is None:
                    assert e2 is None
                    continue
                assert set(e1) == set(e2)
                for tok in e1:
                    assert e2[tok].logprob == pytest.approx(e1[tok].logprob, abs=LOGPROB_TOLERANCE)


@pytest.mark.parametrize("name,overrides", [
    ("llama", {}),  # GQA: 4 q heads, 2 kv heads -> one kv head per rank
    ("qwen2", {}),  # 1 kv head < 2 ranks: replicated; q/k/v biases split with their rows
    ("qwen3", {}),  # head_dim 32 != hidden / heads, q/k RMSNorm per head
    ("llama_tied_llama3rope", {}),  # tied embedding / LM head over a padded vocabulary (777 -> 778)
    ("llama", {"intermediate_size": 101, "vocab_size": 1001}),  # odd MLP split (51 + 50 rows) and vocab padding
    ("mistral_window", {}),  # sliding-window attention on each rank's heads
    ("phi3_longrope", {}),  # fused qkv / gate_up checkpoint tensors split by the model, then sliced per rank
    ("gemma2", {}),  # GeGLU MLP, soft-capped attention and final logits (capped after the gather), windows
    ("gemma3", {}),  # one KV head (replicated), Gemma q/k norms, local/global RoPE tables
    ("gpt2", {}),  # transposed Conv1D and fused c_attn tensors, biased row-parallel c_proj, learned positions
    ("qwen3_moe", {"moe_intermediate_size": 41}),  # per-expert tensors, an odd split of each expert (21 + 20)
    ("mixtral", {}),  # w1 / w3 / w2 experts, window
])
def test_two_ranks_give_the_single_worker_results(name, overrides, tmp_path):
    path = build_tiny_model(name, str(tmp_path / name), **overrides)
    info = model_info(path)
    config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=BLOCK_SIZE, max_model_len=128)
    single = run_steps(Worker(config, info))
    ranks = run_ranks(2, lambda groups: run_steps(Worker(config, info, tp=groups.tp, device=torch.device("cpu"))))
    assert all(out.sampled_token_ids == {} for out in ranks[1])  # only rank 0 samples and reports
    assert_same_outputs(single, ranks[0])
    assert len(single[-1].sampled_token_ids) == len(PROMPTS)


def test_each_rank_holds_only_its_shard(tmp_path):
    path = build_tiny_model("qwen2", str(tmp_path / "qwen2"))
    info = model_info(path)
    config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=BLOCK_SIZE, max_model_len=128)
    full = Worker(config, info).model

    def shard(groups):
        worker = Worker(config, info, tp=groups.tp, device=torch.device("cpu"))
        return {name: p.detach().clone() for name, p in worker.model.named_parameters()}

    ranks = run_ranks(2, shard)
    hd = 16  # hidden 64 / 4 heads
    ref = dict(full.named_parameters())
    for rank, params in enumerate(ranks):
        qkv = params["model.layers.0.self_attn.qkv_proj.weight"]  # [2 q heads + 1 k + 1 v, hidden]
        full_qkv = ref["model.layers.0.self_attn.qkv_proj.weight"]  # [4 q + 1 k + 1 v heads]
        assert qkv.shape == (4 * hd, 64)
        assert torch.equal(qkv[: 2 * hd], full_qkv[rank * 2 * hd:(rank + 1) * 2 * hd])  # its q heads
        assert torch.equal(qkv[2 * hd:], full_qkv[4 * hd:])  # the one kv head, replicated
        o = params["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(o, ref["model.layers.0.self_attn.o_proj.weight"][:, rank * 32:(rank + 1) * 32])
        emb = params["model.embed_tokens.weight"]  # vocab 911 -> 912 rows, 456 per rank
        assert emb.shape == (456, 64)
        real = min(911, (rank + 1) * 456) - rank * 456
        assert torch.equal(emb[:real], ref["model.embed_tokens.weight"][rank * 456: rank * 456 + real])
        assert not emb[real:].any()  # padding rows are zeros


def test_skinny_gemm_dispatch_and_fused_prologues_serve_the_shards(tmp_path, monkeypatch):
    """Decode steps take the skinny-GEMM paths on each rank's shard shapes, the RMSNorm and
    SiLU-and-mul prologues fused (the row-parallel down_proj all-reduces the fused call's
    output): the plain single worker's results. The three kernels are stood in for by their
    torch references (the Triton interpreter is far too slow here; the kernels themselves are
    tested against these references in tests/kernels/test_gemv.py)."""
    path = build_tiny_model("qwen3", str(tmp_path / "qwen3"))
    info = model_info(path)
    config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=BLOCK_SIZE, max_model_len=128)
    single = run_steps(Worker(config, info))
    calls = []

    def stand_in(name, fn):
        def call(*args, out=None, pdl=True):
            calls.append((name, tuple(args[1 if name == "silu_mul" else (4 if name == "rms_norm" else 1)].shape)))
            return fn(*args)
        return call

    monkeypatch.setattr(gemv, "skinny_gemm", stand_in("plain", reference.skinny_gemm_reference))
    monkeypatch.setattr(gemv, "rms_norm_skinny_gemm", stand_in("rms_norm", reference.rms_norm_skinny_gemm_reference))
    monkeypatch.setattr(gemv, "silu_mul_skinny_gemm", stand_in("silu_mul", reference.silu_mul_skinny_gemm_reference))

    def rank(groups):
        worker = Worker(config, info, tp=groups.tp, device=torch.device("cpu"))
        configure_kernels(worker.model, KernelOptions(gemv_on_cpu=True))
        set_gemv_rows(worker.model, {gemv_shape(m): 8 for m in worker.model.modules() if isinstance(m, Linear)})
        return run_steps(worker)

    ranks = run_ranks(2, rank)
    assert_same_outputs(single, ranks[0])
    # each rank's shard shapes (hidden 64, 2 of 4 q heads and 1 of 2 kv heads of 32, 40 of 80 MLP rows)
    assert set(calls) == {("rms_norm", (128, 64)), ("rms_norm", (80, 64)), ("plain", (64, 64)),
                          ("silu_mul", (64, 40)), ("plain", (502, 64))}
    kinds = [kind for kind, _ in calls]  # decode steps only (the prefill's 43 rows are too many), per rank and layer
    assert kinds.count("silu_mul") == 2 * 2 * NUM_DECODE_STEPS
    assert kinds.count("rms_norm") == 2 * 2 * 2 * NUM_DECODE_STEPS


def test_gguf_tensors_are_dequantized_then_sliced(tmp_path):
    """A Q8_0 llama GGUF (Q/K rows stored in llama.cpp's permuted order): each rank dequantizes
    a tensor whole, undoes the permutation, then keeps its rows or columns, so the two ranks
    give the single worker's results and each holds exactly its slice of the single model."""
    from gguf import GGMLQuantizationType

    from loading.test_gguf_loader import HEADS, HIDDEN, KV_HEADS, write_tiny_model

    path, _ = write_tiny_model(tmp_path / "tiny-q8.gguf", "llama", GGMLQuantizationType.Q8_0)
    info = model_info(path)
    # fp32: the single worker dequantizes too (by default it keeps Q8_0 blocks as int8, which
    # tensor_parallel_size > 1 does not: quantized layers are not split)
    config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=BLOCK_SIZE, max_model_len=128,
                          cpu_weight_format="fp32")
    single_worker = Worker(config, info)
    full = {name: p.detach().clone() for name, p in single_worker.model.named_parameters()}
    single = run_steps(single_worker)

    def rank(groups):
        worker = Worker(config, info, tp=groups.tp, device=torch.device("cpu"))
        params = {name: p.detach().clone() for name, p in worker.model.named_parameters()}
        return params, run_steps(worker)

    ranks = run_ranks(2, rank)
    assert_same_outputs(single, ranks[0][1])
    hd, q_rows = HIDDEN // HEADS, HIDDEN // 2  # 2 of 4 q heads and 1 of 2 kv heads per rank
    full_qkv = full["model.layers.0.self_attn.qkv_proj.weight"]  # [4 q + 2 k + 2 v heads, hidden]
    for r, (params, _) in enumerate(ranks):
        qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
        assert qkv.shape == (q_rows + 2 * hd, HIDDEN)
        assert torch.equal(qkv[:q_rows], full_qkv[r * q_rows:(r + 1) * q_rows])
        k0, v0 = HEADS * hd, (HEADS + KV_HEADS) * hd  # first k and v rows of the full tensor
        assert torch.equal(qkv[q_rows:q_rows + hd], full_qkv[k0 + r * hd:k0 + (r + 1) * hd])
        assert torch.equal(qkv[q_rows + hd:], full_qkv[v0 + r * hd:v0 + (r + 1) * hd])
        down = params["model.layers.1.mlp.down_proj.weight"]  # row-parallel: input columns split
        assert torch.equal(down, full["model.layers.1.mlp.down_proj.weight"][:, r * 256:(r + 1) * 256])
