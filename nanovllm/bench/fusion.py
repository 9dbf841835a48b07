"""The fused RMSNorm + skinny GEMM kernel alone, against RMSNorm + cuBLAS, per decode shape.

For every projection of each model (qkv, o, gate_up, down, lm_head; weight [N, K] from the
model's config.json) and M = 1, 2, 4, ..., 64 activation rows, four ways to compute
`rms_norm(x + residual) @ W^T` (or part of it):

  fused        kernels/gemv.rms_norm_skinny_gemm: residual add + RMSNorm folded into the Triton
               skinny GEMM, one launch (M <= 8 only: above that the engine uses cuBLAS)
  norm+cublas  kernels/rmsnorm.fused_add_rms_norm (Triton) then F.linear (cuBLAS): the engine's
               unfused path
  cublas       F.linear alone: the GEMM without the norm, the floor of the unfused path
  gemv         gemv.skinny_gemm alone (M <= 8): the fused kernel without its prologue

In the engine the RMSNorm prologue runs before qkv and gate_up (o has none, down takes SiLU-and-mul,
lm_head follows the final norm, run separately); here every shape gets the same RMSNorm prologue,
so the cost of folding a norm into a GEMM of that shape is measured the same way everywhere.

Time: median GPU microseconds of a CUDA-graph replay (host launch cost out, as in the engine's
graphed decode step; gemv.time_us), cycling through weight copies that total >= 2x L2
(gemv.rotation_copies) so that weights come from HBM. Bytes = W + x + residual in + residual out
+ norm weight + output (the minimum any implementation must move); GB/s = bytes / time, and % of
the device-to-device copy bandwidth measured in the same run (bench latency's measurement).

    nanovllm bench fusion                              # both models, M = 1..64 (H200: ~1-2 min)
    nanovllm bench fusion --models qwen3-8b --rows 1,8

CSV rows to benchmarks/results/fusion.csv (device, date, commit in each), one PNG (fusion.png):
% of copy bandwidth against M per projection, fused solid and norm+cublas dashed. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row
from nanovllm.bench.sweep import int_list, model_dir

DEFAULT_MODELS = ("qwen3-0.6b", "qwen3-8b")
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 64)
IMPLS = ("fused", "norm+cublas", "cublas", "gemv")
FUSED_IMPLS = ("fused", "gemv")  # the Triton skinny GEMM: at most gemv.GEMV_MAX_M rows
NORM_EPS = 1e-6
BF16_BYTES = 2
FIELDS = ("model", "proj", "n", "k", "layers", "m", "impl", "us", "bytes", "gbps", "pct_copy", "copy_gbps",
          "vs_norm_cublas", "config")


@dataclass(frozen=True)
class DecodeShape:
    proj: str
    n: int  # output features (weight rows)
    k: int  # input features
    layers: int  # how many of this weight a decode step reads


def decode_shapes(config: dict) -> list[DecodeShape]:
    """The decode step's projection weights of a decoder-only transformer (HF config.json fields)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return [DecodeShape("qkv", (heads + 2 * kv_heads) * head_dim, hidden, layers),
            DecodeShape("o", hidden, heads * head_dim, layers),
            DecodeShape("gate_up", 2 * inter, hidden, layers),
            DecodeShape("down", hidden, inter, layers),
            DecodeShape("lm_head", config["vocab_size"], hidden, 1)]


def moved_bytes(m: int, n: int, k: int, elem: int = BF16_BYTES) -> int:
    """Bytes `rms_norm(x + residual) @ W^T` must move at least: W [N, K], x and residual in [M, K],
    the new residual out [M, K], the norm weight [K], the output [M, N]."""
    return elem * (n * k + 3 * m * k + k + m * n)


def impls_for(m: int, max_fused_rows: int) -> tuple[str, ...]:
    """The implementations that exist for M rows (the skinny GEMM stops at max_fused_rows)."""
    return tuple(i for i in IMPLS if i not in FUSED_IMPLS or m <= max_fused_rows)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated model dirs or names in benchmarks/configs/ "
                        f"(default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--rows", type=int_list, default=list(DEFAULT_ROWS), help="M values (default 1,2,4,8,16,32,64)")
    p.add_argument("--result-dir", default=RESULTS_DIR, help="where fusion.csv and fusion.png go")


def check(args) -> None:
    """CUDA kernels are timed: refused (ValueError) where there is no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench fusion times CUDA kernels (Triton and cuBLAS) and needs a CUDA GPU; none is "
                         "visible here. Run it on a GPU machine (benchmarks/gpu_suite.sh fusion)")
    for name in args.models.split(","):
        model_dir(name.strip())


def load_config(model: str) -> dict:
    with open(os.path.join(model_dir(model), "config.json")) as f:
        return json.load(f)


def bench_shape(shape: DecodeShape, rows: list[int], copy_bw: float) -> list[dict]:
    """Rows of FIELDS (without model) for one weight shape at every M."""
    import torch
    import torch.nn.functional as F

    from nanovllm.kernels import gemv
    from nanovllm.kernels.rmsnorm import fused_add_rms_norm

    dtype, dev = torch.bfloat16, torch.device("cuda")
    n, k = shape.n, shape.k
    w = torch.randn(n, k, device=dev, dtype=dtype) * k**-0.5
    copies = [w] + [w.clone() for _ in range(gemv.rotation_copies(w.numel() * BF16_BYTES, gemv._l2_bytes(dev)) - 1)]
    norm_w = torch.ones(k, device=dev, dtype=dtype)
    out = []
    for m in rows:
        x = torch.randn(m, k, device=dev, dtype=dtype)
        res = torch.randn(m, k, device=dev, dtype=dtype)
        calls = {
            "fused": lambda wc: gemv.rms_norm_skinny_gemm(x, res, norm_w, NORM_EPS, wc),
            "norm+cublas": lambda wc: F.linear(fused_add_rms_norm(x, res, norm_w, NORM_EPS)[0], wc),
            "cublas": lambda wc: F.linear(x, wc),
            "gemv": lambda wc: gemv.skinny_gemm(x, wc),
        }
        times = {}
        for impl in impls_for(m, gemv.GEMV_MAX_M):
            call = calls[impl]
            times[impl] = gemv.time_us(lambda: [call(wc) for wc in copies], calls=len(copies))
        nbytes = moved_bytes(m, n, k)
        for impl, us in times.items():
            gbps = nbytes / us / 1e3
            out.append({"proj": shape.proj, "n": n, "k": k, "layers": shape.layers, "m": m, "impl": impl,
                        "us": round(us, 2), "bytes": nbytes, "gbps": round(gbps, 1),
                        "pct_copy": round(100 * gbps * 1e9 / copy_bw, 1), "copy_gbps": round(copy_bw / 1e9, 1),
                        "vs_norm_cublas": round(times["norm+cublas"] / us, 3),
                        "config": (gemv.best_config(m, n, k) or "") if impl in FUSED_IMPLS else ""})
    del copies, w
    torch.cuda.empty_cache()
    return out


def summary_lines(rows: list[dict]) -> list[str]:
    """Per model and M: the step's projections (x layers) fused vs norm+cuBLAS, in microseconds."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for m in sorted({int(r["m"]) for r in rows if r["model"] == model}):
            sel = [r for r in rows if r["model"] == model and int(r["m"]) == m]
            total = {impl: sum(float(r["us"]) * int(r["layers"]) for r in sel if r["impl"] == impl) for impl in IMPLS}
            if total["fused"]:
                lines.append(f"# {model} M={m}: all projections x layers, fused {total['fused']:.0f} us vs norm+cuBLAS "
                             f"{total['norm+cublas']:.0f} us ({total['norm+cublas'] / total['fused']:.2f}x)")
    return lines


def run(args) -> int:
    from nanovllm.bench.latency import measure_copy_bandwidth

    check(args)
    base = base_row()
    copy_bw = measure_copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s ({base['device']})")
    print(f"{'model':<11} {'proj':<8} {'N x K':<12} {'M':>3} " + " ".join(f"{i:>16}" for i in IMPLS)
          + "   (us, % of copy bandwidth)")
    rows, csv_path = [], os.path.join(args.result_dir, "fusion.csv")
    for name in args.models.split(","):
        model = os.path.basename(os.path.normpath(model_dir(name.strip())))
        for shape in decode_shapes(load_config(name.strip())):
            part = [{"model": model, **r} for r in bench_shape(shape, args.rows, copy_bw)]
            for m in args.rows:
                cells = {r["impl"]: f"{r['us']:>8.1f} {r['pct_copy']:>5.1f}%" for r in part if r["m"] == m}
                print(f"{model:<11} {shape.proj:<8} {f'{shape.n}x{shape.k}':<12} {m:>3} "
                      + " ".join(f"{cells.get(i, '-'):>16}" for i in IMPLS), flush=True)
            csv_path = append_rows(csv_path, [{**base, **{f: r[f] for f in FIELDS}} for r in part])
            rows += part
    print("\n".join(summary_lines(rows)))
    print(f"plot: {plot(rows, os.path.join(args.result_dir, 'fusion.png'), base)}  (CSV: {csv_path})")
    return 0


def plot(rows: list[dict], path: str, base: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        projs = list(dict.fromkeys(r["proj"] for r in rows if r["model"] == model))
        for i, proj in enumerate(projs):
            color = f"C{i}"
            for impl, style in (("fused", "-"), ("norm+cublas", "--")):
                sel = sorted((int(r["m"]), float(r["pct_copy"])) for r in rows
                             if r["model"] == model and r["proj"] == proj and r["impl"] == impl)
                if sel:
                    ax.plot([s[0] for s in sel], [s[1] for s in sel], style, marker="o", markersize=3, color=color,
                            label=f"{proj} {impl}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (activation rows)")
        ax.set_ylabel("% of measured copy bandwidth")
        ax.set_title(model, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"RMSNorm + GEMM: fused skinny GEMM vs Triton RMSNorm + cuBLAS ({base['device']}, {base['commit']}, "
                 f"{base['date']} UTC)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
