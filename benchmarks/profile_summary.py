"""Kernel count and GPU time per kernel class per decode step, RMSNorm+linear fusion on and off.

For each model (default Qwen3-0.6B and Qwen3-8B shapes, random weights) and decode batch
(default 1 and 64, context 512), torch.profiler over --steps decode steps (CUDA graphs on, as
served) on one engine per (model, fuse_gemv_prologues) setting. Kernel names (our Triton
kernels, cuBLAS's nvjet / cutlass GEMMs, PyTorch's own) are sorted into classes by
`kernel_class`; per class: launches and GPU milliseconds per step.

    python benchmarks/profile_summary.py                       # H200: ~2-3 min
    python benchmarks/profile_summary.py --models qwen3-0.6b --batches 1

Writes benchmarks/results/profile_summary.csv (one row per model, batch, fusion, class; device,
date and commit in each) and profile_summary.md (the same as a table, for the docs). No traces
are kept (profile_decode.py --trace writes one). --ncu prints the Nsight Compute command that
reads the fused kernel's DRAM throughput and occupancy on one decode shape (`--ncu-target`,
which launches only that kernel inside an NVTX range; gpu_suite.sh step `ncu`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row  # noqa: E402

DEFAULT_MODELS = ("qwen3-0.6b", "qwen3-8b")
DEFAULT_BATCHES = (1, 64)
CONTEXT = 512
# (class, substrings of the lower-cased kernel name); the first class with a match wins
KERNEL_CLASSES = (
    ("gemv/gemm", ("skinny_gemm", "nvjet", "gemm", "gemv", "cutlass", "cublas", "xmma", "splitkreduce",
                   # quantized linears (kernels/quant_gemv.py, quant_gemm.py): the GEMVs, the GEMM's dot and
                   # dequantization, the activations' fp8 rows
                   "_words_kernel", "_fp8_kernel", "_dot_kernel", "dequant")),
    ("attention", ("attention", "decode_split", "merge_splits", "decode_reduce", "shared_prefix", "cascade",
                   "flash", "fmha")),
    ("norm", ("rms_norm", "layer_norm", "layernorm", "rmsnorm")),
    ("rope", ("rope", "rotary", "store_kv")),
    ("activation", ("silu", "gelu", "act_and_mul")),
    ("sampling", ("sample", "pick_chunk", "uniform_bits", "argmax", "topk", "top_k", "multinomial")),
)
OTHER = "copy/other"
CLASSES = tuple(c for c, _ in KERNEL_CLASSES) + (OTHER,)
NCU_METRICS = ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__warps_active.avg.pct_of_peak_sustained_active",
               "gpu__time_duration.sum", "launch__registers_per_thread")


def kernel_class(name: str) -> str:
    """The class of a GPU kernel (or memcpy / memset) from its profiler name."""
    low = name.lower()
    for cls, needles in KERNEL_CLASSES:
        if any(n in low for n in needles):
            return cls
    return OTHER


def summarize(kernels, steps: int) -> dict[str, tuple[float, float]]:
    """{class: (launches per step, GPU ms per step)} over KernelStat-like (name, device_us, count)."""
    out = {c: [0.0, 0.0] for c in CLASSES}
    for k in kernels:
        c = out[kernel_class(k.name)]
        c[0] += k.count / steps
        c[1] += k.device_us / steps / 1e3
    return {c: (round(n, 1), round(ms, 4)) for c, (n, ms) in out.items()}


def markdown_table(rows: list[dict]) -> str:
    """One line per (model, batch, fused): launches / GPU ms per step of each class, then the totals."""
    head = "| model | batch | fused | " + " | ".join(CLASSES) + " | total | wall ms/step |"
    lines = [head, "|" + "---|" * (len(CLASSES) + 5)]
    keys = list(dict.fromkeys((r["model"], r["batch"], r["fused"]) for r in rows))
    for key in keys:
        sel = {r["kernel_class"]: r for r in rows if (r["model"], r["batch"], r["fused"]) == key}
        cells = [f"{sel[c]['launches_per_step']:g} / {sel[c]['gpu_ms_per_step']:.3f}" if c in sel else "-"
                 for c in CLASSES]
        total_n = sum(float(r["launches_per_step"]) for r in sel.values())
        total_ms = sum(float(r["gpu_ms_per_step"]) for r in sel.values())
        wall = next(iter(sel.values()))["wall_ms_per_step"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                     + f" | {total_n:g} / {total_ms:.3f} | {wall} |")
    return "\n".join(lines)


NCU_RANGE = "fused"  # the NVTX range around the launches ncu measures (autotuning stays outside it)
NCU_LAUNCHES = 10


def ncu_command(target: str = "qwen3-8b:gate_up:1") -> str:
    """Nsight Compute over the fused kernel's launches of `--ncu-target` (MODEL:PROJ:M), autotuning excluded."""
    return (f"ncu --nvtx --nvtx-include {NCU_RANGE}/ --metrics {','.join(NCU_METRICS)} "
            f"python benchmarks/profile_summary.py --ncu-target {target}")


def run_ncu_target(target: str) -> None:
    """NCU_LAUNCHES launches of the fused RMSNorm + skinny GEMM on one decode shape, inside NCU_RANGE."""
    import torch

    from nanovllm.bench.fusion import NORM_EPS, decode_shapes, load_config
    from nanovllm.kernels import gemv

    try:
        name, proj, m = target.split(":")
        shape = next(s for s in decode_shapes(load_config(name)) if s.proj == proj)
        m = int(m)
        if not 1 <= m <= gemv.GEMV_MAX_M:
            raise ValueError(m)
    except (ValueError, StopIteration):
        raise SystemExit(f"--ncu-target takes MODEL:PROJ:M (PROJ one of qkv, o, gate_up, down, lm_head; M <= "
                         f"{gemv.GEMV_MAX_M}), e.g. qwen3-8b:gate_up:1; got {target!r}") from None
    dev, dtype = torch.device("cuda"), torch.bfloat16
    w = torch.randn(shape.n, shape.k, device=dev, dtype=dtype)  # [N, K]
    x, res = torch.randn(m, shape.k, device=dev, dtype=dtype), torch.randn(m, shape.k, device=dev, dtype=dtype)
    norm_w = torch.ones(shape.k, device=dev, dtype=dtype)
    gemv.rms_norm_skinny_gemm(x, res, norm_w, NORM_EPS, w)  # autotune, outside the range
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(NCU_RANGE)
    for _ in range(NCU_LAUNCHES):
        gemv.rms_norm_skinny_gemm(x, res, norm_w, NORM_EPS, w)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"{NCU_LAUNCHES} launches of the fused kernel, {name} {proj} [{shape.n}, {shape.k}] M={m}, config "
          f"{gemv.best_config(m, shape.n, shape.k)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated model dirs or names in benchmarks/configs/")
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="decode batches (default 1,64)")
    ap.add_argument("--context", type=int, default=CONTEXT, help=f"prompt tokens per request (default {CONTEXT})")
    ap.add_argument("--steps", type=int, default=20, help="profiled decode steps (default 20)")
    ap.add_argument("--result-dir", default=RESULTS_DIR)
    ap.add_argument("--ncu", action="store_true", help="print the ncu command for the fused kernel and exit")
    ap.add_argument("--ncu-target", metavar="MODEL:PROJ:M",
                    help="only launch the fused kernel on this shape inside an NVTX range, for ncu (see --ncu)")
    args = ap.parse_args()
    if args.ncu:
        print(ncu_command())
        return
    if args.ncu_target:
        run_ncu_target(args.ncu_target)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("profile_summary.py profiles CUDA kernels and needs a CUDA GPU; none is visible here")
    from nanovllm.bench.engines import release
    from nanovllm.bench.sweep import int_list, model_dir
    from profile_decode import decode_engine, profile_steps

    batches = int_list(args.batches)
    base, rows = base_row(), []
    csv_path = os.path.join(args.result_dir, "profile_summary.csv")
    for name in args.models.split(","):
        model = model_dir(name.strip())
        label = os.path.basename(os.path.normpath(model))
        for fused in (True, False):
            llm = decode_engine(model, max(batches), args.context, fuse_gemv_prologues=fused)
            part = []
            for batch in batches:
                prof = profile_steps(llm, batch, args.context, args.steps)
                for cls, (n, ms) in summarize(prof.kernels, args.steps).items():
                    part.append({**base, "model": label, "batch": batch, "context": args.context, "fused": fused,
                                 "kernel_class": cls, "launches_per_step": n, "gpu_ms_per_step": ms,
                                 "wall_ms_per_step": round(prof.wall_ms, 3), "steps": args.steps})
                print(f"{label} batch {batch} fused={fused}: wall {prof.wall_ms:.3f} ms/step, GPU {prof.gpu_ms:.3f} "
                      f"ms/step", flush=True)
            release(llm)
            csv_path = append_rows(csv_path, part)
            rows += part
    table = markdown_table(rows)
    md_path = os.path.join(args.result_dir, "profile_summary.md")
    with open(md_path, "w") as f:
        f.write(f"# Decode step by kernel class: launches / GPU ms per step\n\n{base['device']}, commit "
                f"{base['commit']}, {base['date']} UTC; context {args.context}, {args.steps} profiled steps, CUDA "
                f"graphs on, random weights. `python benchmarks/profile_summary.py` (rows: profile_summary.csv).\n\n"
                f"{table}\n")
    print(table)
    print(f"(CSV: {csv_path}, table: {md_path}); fused kernel bandwidth / occupancy: {ncu_command()}")


if __name__ == "__main__":
    main()
