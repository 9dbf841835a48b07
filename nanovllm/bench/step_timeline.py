"""Where the time of a throughput run goes: the per-step timeline as CSV, a plot, and a summary.

The worker records one `StepRecord` per step (`step_timeline=True`, worker/timeline.py): its
kind, batch, tokens, GPU time, the GPU's idle gap before it, and the bytes and FLOPs it had to
move. A step's floor is max(bytes / bandwidth, FLOPs / peak); what the run spends above the
floor is split into buckets that point at a fix:

- prefill: steps with prompt chunks (prefill or mixed): chunk size, attention over long prompts;
- decode by batch band: decode steps of 1-8, 9-32, 33-128, 129+ requests (attention balance,
  launch overhead at small batch);
- host gaps: the GPU idle between steps (the host was late: scheduling, input building);
- tail: decode steps after the last prefill once fewer than TAIL_FRACTION of the peak batch
  remain (the run's end, where few long requests keep the GPU under-used).

    nanovllm bench throughput --model benchmarks/configs/qwen3-0.6b --timeline
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable

H200_BANDWIDTH = 4.22e12  # bytes/s, measured device-to-device copy rate (docs/performance.md)
H200_PEAK_FLOPS = 790e12  # bf16 dense GEMM, measured
DECODE_BANDS = ((1, 8), (9, 32), (33, 128), (129, None))  # requests per decode step, inclusive
TAIL_FRACTION = 0.125  # the tail: after the last prefill, fewer than this fraction of the peak batch


def band_name(lo: int, hi) -> str:
    return f"decode {lo}-{hi}" if hi is not None else f"decode {lo}+"


def decode_band(num_seqs: int) -> str:
    for lo, hi in DECODE_BANDS:
        if num_seqs >= lo and (hi is None or num_seqs <= hi):
            return band_name(lo, hi)
    raise ValueError(f"a decode step needs at least one request, got {num_seqs}")


def bucket_of(records: list) -> list[str]:
    """The summary bucket of each step (see the module docstring)."""
    if not records:
        return []
    peak = max(r.num_seqs for r in records)
    last_prefill = max((i for i, r in enumerate(records) if r.kind != "decode"), default=-1)
    out = []
    for i, r in enumerate(records):
        if r.kind != "decode":
            out.append("prefill")
        elif i > last_prefill and r.num_seqs < TAIL_FRACTION * peak:
            out.append("tail")
        else:
            out.append(decode_band(r.num_seqs))
    return out


def summarize(records: list, bandwidth: float = H200_BANDWIDTH, peak_flops: float = H200_PEAK_FLOPS) -> dict:
    """Seconds per bucket: steps, GPU time, floor, GPU time above the floor; and the host gaps."""
    buckets = ["prefill"] + [band_name(lo, hi) for lo, hi in DECODE_BANDS] + ["tail"]
    out = {b: {"steps": 0, "gpu_s": 0.0, "floor_s": 0.0, "above_s": 0.0} for b in buckets}
    for r, b in zip(records, bucket_of(records)):
        floor = r.floor_ms(bandwidth, peak_flops) / 1e3
        row = out[b]
        row["steps"] += 1
        row["gpu_s"] += r.gpu_ms / 1e3
        row["floor_s"] += floor
        row["above_s"] += max(0.0, r.gpu_ms / 1e3 - floor)
    gaps = sum(r.gap_ms for r in records) / 1e3
    out["host gaps"] = {"steps": len(records), "gpu_s": 0.0, "floor_s": 0.0, "above_s": gaps}
    return out


def format_summary(summary: dict) -> str:
    total_floor = sum(v["floor_s"] for v in summary.values())
    total = sum(v["gpu_s"] for v in summary.values()) + summary["host gaps"]["above_s"]
    lines = [f"{'bucket':<16}{'steps':>7}{'GPU s':>9}{'floor s':>9}{'above s':>9}"]
    for name, v in summary.items():
        if v["steps"]:
            lines.append(f"{name:<16}{v['steps']:>7}{v['gpu_s']:>9.3f}{v['floor_s']:>9.3f}{v['above_s']:>9.3f}")
    share = total_floor / total if total > 0 else 0.0
    lines.append(f"total: {total:.3f} s of GPU time + gaps, floor {total_floor:.3f} s ({100 * share:.0f}% of it)")
    return "\n".join(lines)


def write_csv(path: str, records: Iterable, bandwidth: float = H200_BANDWIDTH,
              peak_flops: float = H200_PEAK_FLOPS) -> str:
    records = list(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = None
        for r, b in zip(records, bucket_of(records)):
            row = {**dataclasses.asdict(r), "bucket": b, "floor_ms": round(r.floor_ms(bandwidth, peak_flops), 4)}
            if w is None:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
            w.writerow(row)
    return path


def plot(path: str, records: list, title: str, bandwidth: float = H200_BANDWIDTH,
         peak_flops: float = H200_PEAK_FLOPS) -> str:
    """Per step: GPU time and floor (top), batch size (bottom), over the run's steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, height_ratios=[2, 1])
    ax.plot(steps, [r.gpu_ms for r in records], lw=0.6, label="GPU ms")
    ax.plot(steps, [r.floor_ms(bandwidth, peak_flops) for r in records], lw=0.6, label="floor ms")
    ax.plot(steps, [r.gap_ms for r in records], lw=0.6, label="host gap ms")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    bx.plot(steps, [r.num_seqs for r in records], lw=0.6, color="gray")
    bx.set_ylabel("requests")
    bx.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
