"""Time one sparse MoE layer: the Triton fused-MoE kernel vs the per-expert torch reference.

Default shape: a Qwen3-30B-A3B layer (hidden 2048, 128 experts, top-8, moe_intermediate 768),
bf16, random routing. Per token count: milliseconds of each, the speedup, the expert-weight
bytes the layer must read (experts hit at least once) as GB/s, and TFLOP/s. CSV rows go to
benchmarks/results/moe_layer.csv.

    python benchmarks/moe_bench.py [--tokens 1 16 256 4096] [--experts 128 --top-k 8 ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.kernels.fused_moe import fused_moe  # noqa: E402
from nanovllm.kernels.moe_reference import fused_moe_reference  # noqa: E402
from nanovllm.layers.moe import route  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_layer.csv")
WARMUP_MS, REP_MS = 25, 100


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS)  # ms (median)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--csv", default=RESULTS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("moe_bench needs a CUDA device")
        return 1
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(args.experts, 2 * args.inter, args.hidden, device=dev, dtype=dtype, generator=g) * 0.02
    w2 = torch.randn(args.experts, args.hidden, args.inter, device=dev, dtype=dtype, generator=g) * 0.02
    expert_bytes = 3 * args.hidden * args.inter * w13.element_size()
    rows = []
    name = torch.cuda.get_device_name()
    print(f"{name}: MoE layer hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, inter {args.inter}, bf16")
    print(f"{'tokens':>7} {'triton ms':>10} {'ref ms':>9} {'speedup':>8} {'experts hit':>12} {'GB/s':>7} {'TFLOP/s':>8}")
    for t in args.tokens:
        x = torch.randn(t, args.hidden, device=dev, dtype=dtype, generator=g)
        logits = torch.randn(t, args.experts, device=dev, generator=g)
        weights, ids = route(logits, args.top_k, renormalize=True)
        ms = bench(lambda: fused_moe(x, w13, w2, weights, ids))
        ref_ms = bench(lambda: fused_moe_reference(x, w13, w2, weights, ids))
        hit = int(torch.unique(ids).numel())
        gbps = hit * expert_bytes / ms / 1e6
        tflops = 2 * t * args.top_k * 3 * args.hidden * args.inter / ms / 1e9
        print(f"{t:>7} {ms:>10.3f} {ref_ms:>9.3f} {ref_ms / ms:>7.1f}x {hit:>12} {gbps:>7.0f} {tflops:>8.1f}")
        rows.append(dict(device=name, tokens=t, hidden=args.hidden, experts=args.experts, top_k=args.top_k,
                         inter=args.inter, triton_ms=round(ms, 4), reference_ms=round(ref_ms, 4),
                         speedup=round(ref_ms / ms, 2), experts_hit=hit, weight_GBps=round(gbps, 1),
                         tflops=round(tflops, 2), commit=os.environ.get("NANOVLLM_COMMIT", "")))
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"CSV: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
