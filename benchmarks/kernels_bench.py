"""Kernel micro-benchmarks on a CUDA GPU: each Triton kernel against its hardware limit.

    python benchmarks/kernels_bench.py            # compact table + benchmarks/results/kernels_<device>.csv
    python benchmarks/kernels_bench.py --sweep    # also sweep decode split counts / prefill tiles
    python benchmarks/kernels_bench.py --only gemv  # one section (decode, prefill, launch, small, gemv)

Shapes are Qwen3-0.6B's (16 query heads, 8 KV heads, head_dim 128, hidden 1024,
intermediate 3072, bf16). GPU times are `triton.testing.do_bench` medians of a CUDA-graph
replay of the call (host launch cost excluded, as in the engine's graphed decode step; L2
flushed before each run, so memory-bound kernels read from HBM); the `eager` column is the
wall time per back-to-back eager call, i.e. what launch overhead costs without graphs. Memory-bound kernels are
reported in GB/s against PEAK_GBPS (H100 HBM3, measured device-to-device copy); the prefill
kernel in TFLOP/s next to torch SDPA on the same (contiguous, non-paged) data.

The gemv section times the decode-step projections (M = 1..8 rows x nn.Linear weights of
Qwen3-0.6B and Qwen3-8B) with cuBLAS (`F.linear`) and the Triton skinny GEMM (autotuned on
first call, before capture), bytes = W + x + out, against PEAK_GBPS.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nanovllm.bench.report import git_commit  # noqa: E402
from nanovllm.kernels import paged_attention as pa  # noqa: E402
from nanovllm.kernels import gemv  # noqa: E402
from nanovllm.kernels.activation import silu_and_mul  # noqa: E402
from nanovllm.kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402
from nanovllm.kernels.rope_kv_store import rope_and_store_kv  # noqa: E402

PEAK_GBPS = 3000.0  # H100 80GB HBM3, measured copy bandwidth (read + write)
PEAK_TFLOPS = 780.0  # H100 bf16 dense GEMM, measured

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B attention
HIDDEN, INTERMEDIATE = 1024, 3072
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
DECODE_BATCHES = (1, 64, 256)
DECODE_CONTEXTS = (512, 1024, 4096)
PREFILL_LEN = 1024
PREFILL_LEN_LONG = 8192  # --sweep only: does a long prompt want bigger tiles?
TOKEN_COUNTS = (1, 256, 4096)  # rows for the norm / rope / activation kernels
ELEM = torch.finfo(DTYPE).bits // 8
# (model, projection, N, K, layers): per-layer nn.Linear weights [N, K] of the decode step
GEMV_SHAPES = (
    ("qwen3-0.6b", "qkv", 4096, 1024, 28), ("qwen3-0.6b", "o", 1024, 2048, 28),
    ("qwen3-0.6b", "gate_up", 6144, 1024, 28), ("qwen3-0.6b", "down", 1024, 3072, 28),
    ("qwen3-8b", "qkv", 6144, 4096, 36), ("qwen3-8b", "o", 4096, 4096, 36),
    ("qwen3-8b", "gate_up", 24576, 4096, 36), ("qwen3-8b", "down", 4096, 12288, 36),
)
GEMV_ROWS = (1, 4, 8)
SECTIONS = ("decode", "prefill", "launch", "small", "gemv")


def bench(fn) -> float:
    """Median GPU milliseconds of `fn`, launched from a CUDA graph (as the engine's decode step
    runs it), so host launch overhead is out; do_bench flushes L2 before each replay."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def eager_ms(fn, iters: int = 100) -> float:
    """Wall milliseconds per back-to-back eager call: max(host launch cost, GPU time)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def paged_kv(batch: int, context: int):
    """Random bf16 caches with shuffled block tables, `context` tokens per sequence."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return k_cache, v_cache, tables, seq_lens


def bench_decode(rows: list[dict], sweep: bool) -> None:
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            k_cache, v_cache, tables, seq_lens = paged_kv(batch, context)
            query = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
            out = torch.empty_like(query)
            scale = HEAD_DIM**-0.5
            kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * ELEM  # K and V, read once
            splits = pa.choose_num_splits(batch, NUM_KV_HEADS, context, query.device)

            def add(config, fn, eager=None):
                ms = bench(fn)
                gbps = kv_bytes / ms / 1e6
                rows.append(dict(kernel="decode_attention", shape=f"b{batch} ctx{context}", config=config, ms=ms,
                                 eager_ms=eager, gbps=gbps, pct_peak=100 * gbps / PEAK_GBPS, tflops=None))

            def default():
                pa.paged_attention_decode(query, k_cache, v_cache, seq_lens, tables, scale, out=out,
                                          max_seq_len=context)

            add(f"splits={splits} tile={pa.DECODE_TILE_N} stages={pa.DECODE_NUM_STAGES}", default, eager_ms(default))
            if sweep:
                configs = [(n, pa.DECODE_TILE_N, pa.DECODE_NUM_STAGES) for n in (1, 2, 4, 8, 16, 32, 64)]
                configs += [(splits, t, st) for t in (32, 64, 128) for st in (2, 3, 4)]
                for n, tile_n, stages in configs:
                    add(f"splits={n} tile={tile_n} stages={stages} (sweep)", lambda: pa._launch_decode(
                        query, k_cache, v_cache, seq_lens, tables, scale, None, out, n, tile_n,
                        pa.DECODE_NUM_WARPS, stages))


def bench_prefill(rows: list[dict], sweep: bool, seq: int = PREFILL_LEN) -> None:
    k_cache, v_cache, tables, seq_lens = paged_kv(1, seq)
    query = torch.randn(seq, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    qsl = torch.tensor([0, seq], device="cuda", dtype=torch.int32)
    out = torch.empty_like(query)
    scale = HEAD_DIM**-0.5
    flops = 4 * NUM_HEADS * HEAD_DIM * seq * seq / 2  # QK^T and PV, causal half

    def add(name, config, fn, eager=None):
        ms = bench(fn)
        rows.append(dict(kernel=name, shape=f"1x{seq} causal", config=config, ms=ms, eager_ms=eager, gbps=None,
                         pct_peak=100 * flops / ms / 1e9 / PEAK_TFLOPS, tflops=flops / ms / 1e9))

    def default():
        pa.paged_attention(query, k_cache, v_cache, qsl, seq_lens, tables, scale, out=out,
                           max_query_len=seq, max_seq_len=seq)

    cfg = pa._unified_config(seq, NUM_HEADS, NUM_KV_HEADS, query.device)
    add("prefill_attention", "block_m={} tile_n={} warps={} stages={}".format(*cfg), default, eager_ms(default))
    if sweep:
        for block_m, tile_n, warps, stages in [(64, 32, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 2),
                                               (128, 64, 8, 3), (128, 32, 4, 2), (64, 128, 4, 2), (64, 128, 8, 2),
                                               (128, 128, 8, 2), (128, 128, 8, 3), (32, 64, 4, 2)]:
            add("prefill_attention", f"block_m={block_m} tile_n={tile_n} warps={warps} stages={stages} (sweep)",
                lambda: pa._launch_unified(query, k_cache, v_cache, qsl, seq_lens, tables, scale, None, out,
                                           block_m, tile_n, warps, stages))
    # torch SDPA on contiguous [1, H, L, D] tensors (flash backend), GQA expanded.
    q = query.transpose(0, 1).unsqueeze(0)
    k = torch.randn(1, NUM_KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=DTYPE).repeat_interleave(
        NUM_HEADS // NUM_KV_HEADS, dim=1)
    v = torch.randn_like(k)
    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    add("prefill_attention_torch_sdpa", "contiguous, not paged", sdpa, eager_ms(sdpa))


def bench_small_kernels(rows: list[dict]) -> None:
    def add(name, shape, fn, nbytes):
        ms = bench(fn)
        gbps = nbytes / ms / 1e6
        rows.append(dict(kernel=name, shape=shape, config="", ms=ms, eager_ms=eager_ms(fn), gbps=gbps,
                         pct_peak=100 * gbps / PEAK_GBPS, tflops=None))

    weight = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    head_weight = torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE)
    rot = HEAD_DIM
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, rot, 2, device="cuda", dtype=torch.float32) / rot)
    freqs = torch.outer(torch.arange(40960, device="cuda", dtype=torch.float32), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rot] fp32
    for t in TOKEN_COUNTS:
        x = torch.randn(t, HIDDEN, device="cuda", dtype=DTYPE)
        res = torch.randn_like(x)
        add("rms_norm", f"{t}x{HIDDEN}", lambda: rms_norm(x, weight, 1e-6), 2 * x.numel() * ELEM)
        add("fused_add_rms_norm", f"{t}x{HIDDEN}", lambda: fused_add_rms_norm(x, res, weight, 1e-6),
            4 * x.numel() * ELEM)
        qk = torch.randn(t, NUM_HEADS + NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        add("qk_head_rms_norm", f"{t}x{NUM_HEADS + NUM_KV_HEADS}x{HEAD_DIM}",
            lambda: rms_norm(qk, head_weight, 1e-6, out=qk), 2 * qk.numel() * ELEM)
        qkv = torch.randn(t, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda", dtype=DTYPE)
        q = qkv[:, : NUM_HEADS * HEAD_DIM].view(t, NUM_HEADS, HEAD_DIM)
        k = qkv[:, NUM_HEADS * HEAD_DIM : (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM].view(t, NUM_KV_HEADS, HEAD_DIM)
        v = qkv[:, (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM :].view(t, NUM_KV_HEADS, HEAD_DIM)
        num_blocks = math.ceil(t / BLOCK_SIZE) + 1
        k_cache = torch.empty(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=DTYPE)
        v_cache = torch.empty_like(k_cache)
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:t]
        positions = torch.randint(0, 40960, (t,), device="cuda")
        # bytes: read q,k,v, write q,k, write k,v into the cache
        add("rope_and_store_kv", f"{t} tokens",
            lambda: rope_and_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots),
            (qkv.numel() + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM * t + 2 * NUM_KV_HEADS * HEAD_DIM * t) * ELEM)
        gate_up = torch.randn(t, 2 * INTERMEDIATE, device="cuda", dtype=DTYPE)
        add("silu_and_mul", f"{t}x{2 * INTERMEDIATE}", lambda: silu_and_mul(gate_up),
            gate_up.numel() * ELEM * 3 // 2)


def _bench_gemv_shape(rows: list[dict], label: str, n: int, k: int, l2: int) -> list[tuple]:
    """[(M, cuBLAS ms, Triton ms)] per call for one [n, k] weight; rows get both."""
    w = torch.randn(n, k, device="cuda", dtype=DTYPE) * k**-0.5
    copies = [w] + [w.clone() for _ in range(gemv.rotation_copies(w.numel() * ELEM, l2) - 1)]
    result = []
    for m in GEMV_ROWS:
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        out = torch.empty(m, n, device="cuda", dtype=DTYPE)
        nbytes = (n * k + m * k + m * n) * ELEM

        def run_cublas():
            for wc in copies:
                F.linear(x, wc)

        def run_triton():
            for wc in copies:
                gemv.skinny_gemm(x, wc, out=out)

        times = []
        for name, fn in (("gemv_cublas", run_cublas), ("gemv_triton", run_triton)):
            ms = bench(fn) / len(copies)
            times.append(ms)
            gbps = nbytes / ms / 1e6
            config = (gemv.best_config(m, n, k) or "") if name == "gemv_triton" else ""
            rows.append(dict(kernel=name, shape=f"{n}x{k} M{m}", config=f"{label} {config}".strip(), ms=ms,
                             eager_ms=eager_ms(fn) / len(copies), gbps=gbps, pct_peak=100 * gbps / PEAK_GBPS,
                             tflops=None))
        result.append((m, *times))
    return result


def bench_gemv(rows: list[dict]) -> list[tuple]:
    """cuBLAS vs Triton skinny GEMM on the decode projections, weights read from HBM.

    One graph replay runs the GEMM once per weight copy, cycling through copies that total
    >= 2x L2 (gemv.rotation_copies; one copy for matrices above ~L2 size), and the time is
    divided by the number of copies: per-call GPU time with cold weights, and the graph's
    launch cost amortised (at 2-5 us per call it would otherwise dominate)."""
    summary = []
    l2 = gemv._l2_bytes(torch.device("cuda"))
    for model, proj, n, k, layers in GEMV_SHAPES:
        for m, c_ms, t_ms in _bench_gemv_shape(rows, f"{model} {proj}", n, k, l2):
            summary.append((model, proj, n, k, layers, m, (n * k + m * k + m * n) * ELEM, c_ms, t_ms))
        torch.cuda.empty_cache()  # the copies are gone
    return summary


def print_gemv_summary(summary: list[tuple]) -> None:
    """The GEMV table (29 lines, printed last so that `| tail -30` shows it whole)."""
    print(f"# GEMV {str(DTYPE).replace('torch.', '')}: GPU us per call (CUDA graph, weights from HBM), "
          f"% of {PEAK_GBPS:.0f} GB/s")
    header = (f"{'model':<11} {'proj':<8} {'N x K':<12} {'M':>2} {'cuBLAS us':>10} {'%peak':>6} {'Triton us':>10} "
              f"{'%peak':>6} {'speedup':>8}  triton config")
    print(header)
    print("-" * len(header))
    for model, proj, n, k, layers, m, nbytes, c_ms, t_ms in summary:
        pct = [100 * nbytes / t / 1e6 / PEAK_GBPS for t in (c_ms, t_ms)]
        print(f"{model:<11} {proj:<8} {f'{n}x{k}':<12} {m:>2} {c_ms * 1e3:>10.1f} {pct[0]:>5.1f}% {t_ms * 1e3:>10.1f} "
              f"{pct[1]:>5.1f}% {c_ms / t_ms:>7.2f}x  {gemv.best_config(m, n, k) or '-'}")
    for model in dict.fromkeys(r[0] for r in summary):
        parts = []
        for m in GEMV_ROWS:
            picked = [r for r in summary if r[0] == model and r[5] == m]
            c = sum(r[4] * r[7] for r in picked)  # layers x per-call time
            t = sum(r[4] * r[8] for r in picked)
            best = sum(r[4] * min(r[7], r[8]) for r in picked)
            parts.append(f"M={m} {c:.3f}/{t:.3f}/{best:.3f}")
        print(f"# {model} all layers' projections per step, ms cuBLAS/Triton/best-per-shape: {'  '.join(parts)}")


@triton.jit
def _noop_kernel(x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                 BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))


def bench_launch_overhead(rows: list[dict]) -> None:
    """Host cost of one eager Triton launch (20 int args, like the attention kernels): the
    floor under every `eager` number above."""
    x = torch.empty(16, device="cuda")
    args = [1024 + i for i in range(20)]
    ms = eager_ms(lambda: _noop_kernel[(1,)](x, *args, BLOCK=16), iters=1000)
    rows.append(dict(kernel="triton_launch_overhead", shape="noop, 21 args", config="", ms=ms, eager_ms=ms,
                     gbps=None, tflops=None, pct_peak=0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also sweep decode splits and prefill tile configs")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/kernels_<device>.csv)")
    parser.add_argument("--only", action="append", choices=SECTIONS, default=None,
                        help="run only this section (repeatable; default: all). The CSV gets a _<sections> suffix")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name()
    rows: list[dict] = []
    sections = args.only or SECTIONS
    if "decode" in sections:
        bench_decode(rows, args.sweep)
    if "prefill" in sections:
        bench_prefill(rows, args.sweep)
        if args.sweep:
            bench_prefill(rows, args.sweep, seq=PREFILL_LEN_LONG)
    if "launch" in sections:
        bench_launch_overhead(rows)
    if "small" in sections:
        bench_small_kernels(rows)
    gemv_summary = bench_gemv(rows) if "gemv" in sections else None

    date = datetime.datetime.now().isoformat(timespec="seconds")
    commit = git_commit()
    print(f"# {device_name}  triton {triton.__version__}  torch {torch.__version__}  commit {commit}  {date}")
    print(f"# limits: {PEAK_GBPS:.0f} GB/s, {PEAK_TFLOPS:.0f} TFLOP/s bf16")
    print("# us = GPU time (CUDA-graph replay, cold L2); eager = wall time per back-to-back eager call")
    header = (f"{'kernel':<30} {'shape':<18} {'config':<40} {'us':>8} {'eager':>8} {'GB/s':>7} {'TFLOP/s':>8} "
              f"{'%peak':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gbps = f"{r['gbps']:.0f}" if r["gbps"] is not None else "-"
        tflops = f"{r['tflops']:.1f}" if r["tflops"] is not None else "-"
        eager = f"{r['eager_ms'] * 1e3:.1f}" if r.get("eager_ms") is not None else "-"
        print(f"{r['kernel']:<30} {r['shape']:<18} {r['config']:<40} {r['ms'] * 1e3:>8.1f} {eager:>8} {gbps:>7} "
              f"{tflops:>8} {r['pct_peak']:>5.1f}%")

    slug = "".join(c if c.isalnum() else "_" for c in device_name).strip("_")
    suffix = "" if args.only is None else "_" + "_".join(sorted(set(args.only)))  # a partial run keeps the full CSV
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"kernels_{slug}{suffix}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "date", "commit", "kernel", "shape", "config", "us",
                                               "eager_us", "gbps", "tflops", "pct_peak"])
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(device=device_name, date=date, commit=commit, kernel=r["kernel"], shape=r["shape"],
                                 config=r["config"], us=round(r["ms"] * 1e3, 2),
                                 eager_us=None if r.get("eager_ms") is None else round(r["eager_ms"] * 1e3, 2),
                                 gbps=None if r["gbps"] is None else round(r["gbps"], 1),
                                 tflops=None if r["tflops"] is None else round(r["tflops"], 2),
                                 pct_peak=round(r["pct_peak"], 1)))
    print(f"# wrote {path}")
    if gemv_summary:
        print_gemv_summary(gemv_summary)


if __name__ == "__main__":
    main()
