"""Benchmark bookkeeping: one CSV row per measurement (device, date, commit, config) and a PNG plot."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from typing import Optional

from nanovllm import envs

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "benchmarks", "results")


def git_commit() -> str:
    """Short commit of the code being measured; NANOVLLM_COMMIT wins (copies without .git)."""
    if envs.commit():
        return envs.commit()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def base_row() -> dict:
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device_name(),
            "commit": git_commit()}


def append_rows(path: str, rows: list[dict]) -> str:
    """Append rows to a CSV (header from the first row; a new header starts a new file section)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(rows[0])
    exists = os.path.isfile(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:  # schema changed: keep old rows, write to a sibling file
            root, ext = os.path.splitext(path)
            path, exists = f"{root}_v{len(fields)}{ext}", os.path.isfile(f"{root}_v{len(fields)}{ext}")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            w.writeheader()
        w.writerows(rows)
    return path


def bar_plot(path: str, labels: list[str], values: list[float], ylabel: str, title: str,
             annotate_fmt: str = "{:,.0f}", reference: Optional[tuple[str, float]] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(labels) + 2), 3.6))
    bars = ax.bar(labels, values, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"][: len(labels)])
    for b, v in zip(bars, values):
        ax.annotate(annotate_fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=9)
    if reference is not None:
        ax.axhline(reference[1], color="gray", linestyle="--", linewidth=1)
        ax.annotate(reference[0], (0, reference[1]), va="bottom", fontsize=8, color="gray")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
