"""The figure of `nanovllm bench sweep` for one model: 2 x 4 panels, fused solid and unfused dashed.

Top row against prompt length (one line per batch of the prompt sweep), bottom row against batch
size (the batch sweep, plus the prompt sweep's points at its prompt length): TTFT, end-to-end latency,
decode tokens/s, peak allocated GPU memory (left empty on CPU).
"""

from __future__ import annotations

import os

PANELS = (("ttft_ms", "TTFT (ms)"), ("e2e_s", "end-to-end latency (s)"), ("decode_tok_s", "decode tokens/s"),
          ("peak_alloc_gib", "peak allocated (GiB)"))
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _value(row: dict, key: str):
    v = row.get(key, "")
    return None if v in ("", None) else float(v)


def _series(rows: list[dict], x_key: str, key: str) -> tuple[list[float], list[float]]:
    pts = sorted((int(r[x_key]), _value(r, key)) for r in rows if _value(r, key) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def batch_sweep_rows(rows: list[dict]) -> list[dict]:
    """The batch sweep's points: its own rows plus the prompt sweep's rows at its prompt length."""
    batch_rows = [r for r in rows if r["grid"] == "batch"]
    if not batch_rows:
        return []
    prompt_len = int(batch_rows[0]["prompt_len"])
    return [r for r in rows if int(r["prompt_len"]) == prompt_len]


def plot_model(rows: list[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(PANELS), figsize=(4.4 * len(PANELS), 7.6), squeeze=False)
    prompt_rows = [r for r in rows if r["grid"] == "prompt"]
    batches = sorted({int(r["batch"]) for r in prompt_rows})
    by_batch = batch_sweep_rows(rows)
    for col, (key, label) in enumerate(PANELS):
        top, bottom = axes[0][col], axes[1][col]
        for fused in (True, False):
            style = "-" if fused else "--"
            tag = "fused" if fused else "unfused"
            for i, b in enumerate(batches):
                xs, ys = _series([r for r in prompt_rows if int(r["batch"]) == b and _is(r["fused"], fused)],
                                 "prompt_len", key)
                if xs:
                    top.plot(xs, ys, style, marker="o", markersize=3, color=COLORS[i % len(COLORS)],
                             label=f"batch {b}, {tag}")
            xs, ys = _series([r for r in by_batch if _is(r["fused"], fused)], "batch", key)
            if xs:
                bottom.plot(xs, ys, style, marker="o", markersize=3, color=COLORS[0], label=tag)
        batch_label = f"batch size (prompt {by_batch[0]['prompt_len'] if by_batch else '-'})"
        for ax, xlabel in ((top, "prompt length (tokens)"), (bottom, batch_label)):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured (CPU)", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is(value, fused: bool) -> bool:
    """A row's `fused` field (bool in memory, 'True'/'False' read back from the CSV) equals `fused`."""
    return str(value) == str(fused)
