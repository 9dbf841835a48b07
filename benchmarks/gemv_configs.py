"""Every skinny-GEMM config on the decode projections, next to cuBLAS and the copy bandwidth.

    python benchmarks/gemv_configs.py                 # Qwen3-8B and -0.6B shapes, M = 1
    python benchmarks/gemv_configs.py --rows 1 2 --models qwen3-8b

Why: the autotuner and `calibrate_gemv` keep only their pick; choosing which configs to
offer them, and checking the pick, needs the whole table. Each time is the
median of CUDA-graph replays that cycle through weight copies totalling >= 2x L2
(`gemv.time_us`, `gemv.rotation_copies`, as `calibrate_gemv` times), so weights come from
HBM. Writes benchmarks/results/gemv_configs.csv (device, date, commit) and prints the table
sorted per shape, with each time as a share of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernels_bench

from nanovllm.bench.latency import measure_copy_bandwidth  # noqa: E402
from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row  # noqa: E402
from nanovllm.kernels import gemv  # noqa: E402

from kernels_bench import DTYPE, GEMV_SHAPES  # noqa: E402

# model -> [(projection, N, K)]: nn.Linear weights [N, K] of one decode step (the kernel
# benchmark's per-layer shapes, plus the 8B's untied LM head)
SHAPES: dict = {}
for _model, _proj, _n, _k, _layers in GEMV_SHAPES:
    SHAPES.setdefault(_model, []).append((_proj, _n, _k))
SHAPES["qwen3-8b"].append(("lm_head", 151936, 4096))


def config_name(c: gemv.GemvConfig) -> str:
    return f"n{c.block_n} k{c.block_k} w{c.num_warps}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[1])
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "gemv_configs.csv"))
    args = p.parse_args()
    device = torch.device("cuda")
    bw = measure_copy_bandwidth()
    l2 = gemv._l2_bytes(device)
    rows = []
    print(f"# {torch.cuda.get_device_name(0)}: copy {bw / 1e9:,.0f} GB/s, L2 {l2 / 2**20:.0f} MiB; "
          "us per call, weights from HBM; % = bytes / time / copy bandwidth")
    for model in args.models:
        for proj, n, k in SHAPES[model]:
            w = torch.randn(n, k, device=device, dtype=DTYPE) * k**-0.5
            copies = [w] + [w.clone() for _ in range(gemv.rotation_copies(w.numel() * w.element_size(), l2) - 1)]
            for m in args.rows:
                x = torch.randn(m, k, device=device, dtype=DTYPE)
                out = torch.empty(m, n, device=device, dtype=DTYPE)
                nbytes = (n * k + m * k + m * n) * w.element_size()

                def cublas():
                    for wc in copies:
                        F.linear(x, wc)

                timed = [("cublas", gemv.time_us(cublas, calls=len(copies)))]
                for c in gemv.CONFIGS:
                    def triton_(c=c):
                        for wc in copies:
                            gemv.skinny_gemm(x, wc, out=out, config=c)

                    timed.append((config_name(c), gemv.time_us(triton_, calls=len(copies))))

                def tuned():
                    for wc in copies:
                        gemv.skinny_gemm(x, wc, out=out)

                us = gemv.time_us(tuned, calls=len(copies))  # its first, uncaptured call autotunes
                timed.append((f"autotuned ({gemv.best_config(m, n, k)})", us))
                print(f"\n{model} {proj} {n}x{k} M={m} ({nbytes / 1e6:.1f} MB, {len(copies)} copies)")
                for name, us in sorted(timed, key=lambda t: t[1]):
                    pct = 100 * nbytes / (us * 1e-6) / bw
                    print(f"  {name:<34} {us:8.2f} us  {pct:5.1f}%")
                    rows.append({**base_row(), "model": model, "proj": proj, "n": n, "k": k, "m": m,
                                 "config": name, "us": round(us, 3), "pct_copy_bw": round(pct, 1)})
            del copies, w
            torch.cuda.empty_cache()
    append_rows(args.csv, rows)
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
