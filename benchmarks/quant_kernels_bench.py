"""Quantized-weight GEMM kernels on a CUDA GPU, against the HBM limit and against bf16.

    python benchmarks/quant_kernels_bench.py                      # Qwen3-8B decode shapes
    python benchmarks/quant_kernels_bench.py --rows 1 4 16 64     # other row counts
    python benchmarks/quant_kernels_bench.py --qtypes int4        # one format

For every decode projection of Qwen3-8B (qkv after RMSNorm, o, gate_up after RMSNorm, down
after SiLU-and-mul; the LM head stays bf16 unless asked) and every row count M, the table
gives the GPU microseconds of each implementation, timed as CUDA-graph replays cycling
through enough copies of the weight that each replay reads it from HBM (as in a decode step):

  bf16     cuBLAS F.linear on the bf16 weight (the baseline), and the bf16 Triton skinny GEMM
  skinny   quant_gemv (M <= 8), with the norm / SiLU prologue where the layer has one
  dot      quant_gemm's tensor-core kernel
  deq      dequantize to bf16 + cuBLAS (the large-M path)
  fp8mm    torch._scaled_mm with per-row activation scales (fp8 only)

GB/s counts the bytes the kernel must read (codes, scales, x) and write; % is of the copy
bandwidth measured in the same run. The last lines sum one decoder layer x 36 layers at
M = 1 for the best quantized path and for bf16: the projected weight-streaming time of a
batch-1 decode step (attention, norms and the LM head excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm.bench.latency import measure_copy_bandwidth  # noqa: E402
from nanovllm.kernels import gemv, quant_formats, quant_gemm, quant_gemv  # noqa: E402

HIDDEN, INTER, LAYERS = 4096, 12288, 36
QKV_ROWS = (32 + 2 * 8) * 128
# (projection, N, K, prologue)
SHAPES = (("qkv", QKV_ROWS, HIDDEN, quant_gemv.PROLOGUE_RMS_NORM), ("o", HIDDEN, 32 * 128, quant_gemv.PROLOGUE_NONE),
          ("gate_up", 2 * INTER, HIDDEN, quant_gemv.PROLOGUE_RMS_NORM),
          ("down", HIDDEN, INTER, quant_gemv.PROLOGUE_SILU_MUL))
ROTATE_BYTES = 200 * 2**20  # weight copies cycled per timing: > 2x the 50-60 MB L2 of H100 / H200
REPS = 20


def graph_us(fn, calls: int) -> float:
    """Median microseconds per call of fn (which makes `calls` calls), as CUDA-graph replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copies_of(make, nbytes: int) -> list:
    return [make() for _ in range(max(1, min(32, -(-ROTATE_BYTES // max(nbytes, 1)))))]


def bench_shape(name, n, k, prologue, qtypes, rows, bw, out_rows):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * k**-0.5
    bf16_copies = copies_of(lambda: w.clone(), w.numel() * 2)
    norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    results = {}
    for m in rows:
        x_in = torch.randn(m, 2 * k if prologue == quant_gemv.PROLOGUE_SILU_MUL else k, device="cuda",
                           dtype=torch.bfloat16)
        x = x_in[:, :k].contiguous()
        res = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        act_bytes = m * (x_in.shape[1] + n) * 2
        row = {"bf16 cuBLAS": graph_us(lambda: [F.linear(x, c) for c in bf16_copies], len(bf16_copies))}
        if m <= gemv.GEMV_MAX_M:
            row["bf16 skinny"] = graph_us(lambda: [gemv.skinny_gemm(x, c) for c in bf16_copies], len(bf16_copies))
        base = min(row.values())
        for qtype in qtypes:
            qw = quant_formats.quantize(w.float(), qtype).to("cuda")
            qcopies = copies_of(lambda: quant_formats.QuantizedWeight(qw.qtype, qw.data.clone(), qw.scales.clone(),
                                                                    None if qw.biases is None else qw.biases.clone(),
                                                                    qw.group_size, qw.in_features), qw.nbytes())
            paths = {}
            if m <= quant_gemv.QGEMV_MAX_M:
                if prologue == quant_gemv.PROLOGUE_RMS_NORM:
                    paths["skinny"] = lambda: [quant_gemv.quant_rms_norm_skinny_gemm(x, res, norm_w, 1e-6, c) for c in qcopies]
                elif prologue == quant_gemv.PROLOGUE_SILU_MUL:
                    paths["skinny"] = lambda: [quant_gemv.quant_silu_mul_skinny_gemm(x_in, c) for c in qcopies]
                else:
                    paths["skinny"] = lambda: [quant_gemv.quant_skinny_gemm(x, c) for c in qcopies]
            paths["dot"] = lambda: [quant_gemm.quant_dot_gemm(x, c) for c in qcopies]
            paths["deq"] = lambda: [quant_gemm.dequant_linear(x, c) for c in qcopies]
            if qtype == "fp8" and m >= 16:
                paths["fp8mm"] = lambda: [quant_gemm.scaled_mm_fp8(x, c) for c in qcopies]
            for path, fn in paths.items():
                try:
                    us = graph_us(fn, len(qcopies))
                except Exception as e:  # a path that cannot run here is reported, not fatal
                    print(f"  {name} {qtype} {path} M={m}: {type(e).__name__}: {e}")
                    continue
                gbps = (qw.nbytes() + act_bytes) / us / 1e3
                row[f"{qtype} {path}"] = us
                out_rows.append((name, n, k, m, f"{qtype} {path}", us, gbps, 100 * gbps * 1e9 / bw, base / us))
        results[m] = row
        cells = "  ".join(f"{key} {us:7.1f}" for key, us in row.items())
        print(f"{name:8s} {n:6d}x{k:<6d} M={m:<3d} us: {cells}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    ap.add_argument("--qtypes", nargs="+", default=list(quant_formats.QTYPES))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    bw = measure_copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:,.0f} GB/s")
    out_rows: list = []
    per_shape = {name: bench_shape(name, n, k, p, args.qtypes, args.rows, bw, out_rows) for name, n, k, p in SHAPES}
    print(f"\n{'shape':8s} {'M':>4s} {'path':14s} {'us':>8s} {'GB/s':>7s} {'% bw':>6s} {'x bf16':>7s}")
    for name, n, k, m, path, us, gbps, pct, speedup in out_rows:
        print(f"{name:8s} {m:4d} {path:14s} {us:8.1f} {gbps:7.0f} {pct:6.1f} {speedup:7.2f}")
    for m in sorted({r[3] for r in out_rows}):
        bf16 = sum(min(v for key, v in per_shape[s][m].items() if key.startswith("bf16")) for s in per_shape)
        line = f"M={m}: decoder layer weights bf16 {bf16:.1f} us"
        for qtype in args.qtypes:
            best = sum(min((v for key, v in per_shape[s][m].items() if key.startswith(qtype)), default=float("nan"))
                       for s in per_shape)
            line += f" | {qtype} {best:.1f} us ({bf16 / best:.2f}x)"
        print(line + f"   [x{LAYERS} layers: bf16 {bf16 * LAYERS / 1e3:.2f} ms]")


if __name__ == "__main__":
    main()
