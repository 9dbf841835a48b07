"""Attribute the served TTFT from a request timeline CSV (`nanovllm serve --request-timeline PATH`).

    nanovllm bench timeline /tmp/timeline.csv            # prints the breakdown, writes /tmp/timeline.png

Each request's time to first token (arrival -> first chunk sent after the first token) is split
into stages:

    http      arrival -> submitted        body read, JSON validated, prompt tokenized
    handoff   submitted -> queued         waiting for the engine thread (it takes commands between steps)
    queue     queued -> first_scheduled   waiting for a seat or for step budget (queueing behind prefills)
    prefill   first_scheduled -> first_token   the prompt's prefill steps (chunks, mixed with decodes)
    delivery  first_token -> first sent   engine thread -> event loop -> SSE framing -> socket

The PNG has one stacked bar per request (in arrival order) and the mean stages of the median
requests next to those of the slowest 1% (the p99 tail); with the step log beside the CSV
(`*_steps.csv`), a third panel shows each engine step's duration over time, coloured by its
prefill tokens, and the summary splits step durations into steps with and without prefill.
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field
from typing import Optional

STAGES = (("http", "arrival", "submitted"), ("handoff", "submitted", "queued"),
          ("queue", "queued", "first_scheduled"), ("prefill", "first_scheduled", "first_token"),
          ("delivery", "first_token", "first_sent"))
STAGE_COLORS = ("#8172B3", "#CCB974", "#C44E52", "#4C72B0", "#55A868")
TAIL_QUANTILE = 0.99
MEDIAN_BAND = (0.4, 0.6)  # requests whose TTFT rank is in this band stand for "the median request"


@dataclass
class RequestTimes:
    """One HTTP request's stamps (ms since the run's first arrival); its first engine request's engine stamps."""

    http_request: int
    events: dict[str, float] = field(default_factory=dict)
    sent: list[float] = field(default_factory=list)

    @property
    def first_sent(self) -> Optional[float]:
        """The first chunk sent once the first token existed (a chat role chunk may go out before it)."""
        first = self.events.get("first_token")
        after = [t for t in self.sent if first is None or t >= first]
        return min(after) if after else None

    @property
    def ttft(self) -> Optional[float]:
        end = self.first_sent
        return None if end is None or "arrival" not in self.events else end - self.events["arrival"]

    def stages(self) -> Optional[dict[str, float]]:
        """Stage name -> ms, or None when a stamp is missing (a failed or aborted request)."""
        stamps = dict(self.events, first_sent=self.first_sent)
        if any(stamps.get(k) is None for _, a, b in STAGES for k in (a, b)):
            return None
        return {name: stamps[b] - stamps[a] for name, a, b in STAGES}

    def send_gaps(self) -> list[float]:
        """Gaps between consecutive chunks sent from the first token on (the usage and [DONE] chunks included)."""
        first = self.first_sent
        ts = sorted(t for t in self.sent if first is not None and t >= first)
        return [b - a for a, b in zip(ts, ts[1:])]


def load(path: str, skip_first: int = 0) -> list[RequestTimes]:
    """Parse a timeline CSV into one RequestTimes per HTTP request (its first engine request's stamps),
    leaving out the first `skip_first` HTTP requests (a warm-up run)."""
    by_http: dict[int, RequestTimes] = {}
    first_rid: dict[int, str] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            idx = int(row["http_request"])
            if idx < skip_first:
                continue
            rec = by_http.setdefault(idx, RequestTimes(idx))
            t = float(row["t_ms"])
            event = row["event"]
            if event == "sent":
                rec.sent.append(t)
            elif event == "arrival":
                rec.events["arrival"] = t
            elif first_rid.setdefault(idx, row["request_id"]) == row["request_id"]:
                rec.events[event] = t
    return [by_http[k] for k in sorted(by_http)]


@dataclass
class Step:
    t_start: float
    t_end: float
    num_tokens: int
    num_prefill_tokens: int
    num_seqs: int

    @property
    def duration(self) -> float:
        return self.t_end - self.t_start


def load_steps(path: str, since_ms: float = float("-inf")) -> list[Step]:
    """The step log beside a timeline CSV (empty when there is none), steps ending after `since_ms` only."""
    steps_csv = os.path.splitext(path)[0] + "_steps.csv"
    if not os.path.isfile(steps_csv):
        return []
    with open(steps_csv, newline="") as f:
        steps = [Step(float(r["t_start_ms"]), float(r["t_end_ms"]), int(r["num_tokens"]), int(r["num_prefill_tokens"]),
                      int(r["num_seqs"])) for r in csv.DictReader(f)]
    return [st for st in steps if st.t_end > since_ms]


def step_summary(steps: list[Step]) -> dict:
    """Step duration p50/p99 (ms) of the steps with prefill tokens and of the pure decode steps."""
    out = {}
    for name, group in (("prefill", [s for s in steps if s.num_prefill_tokens]),
                        ("decode", [s for s in steps if s.num_tokens and not s.num_prefill_tokens])):
        d = [s.duration for s in group]
        out[name] = {"steps": len(d), "p50_ms": _quantile(d, 0.5) if d else 0.0,
                     "p99_ms": _quantile(d, TAIL_QUANTILE) if d else 0.0}
    return out


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def breakdown(requests: list[RequestTimes]) -> dict:
    """TTFT p50/p99 and the mean stages of the median band and of the p99 tail."""
    complete = [(r, r.stages()) for r in requests]
    complete = [(r, s) for r, s in complete if s is not None]
    if not complete:
        raise ValueError("the timeline has no complete request (no request got a token sent)")
    complete.sort(key=lambda rs: rs[0].ttft)
    n = len(complete)
    ttfts = [r.ttft for r, _ in complete]
    lo, hi = int(MEDIAN_BAND[0] * n), max(int(MEDIAN_BAND[1] * n), int(MEDIAN_BAND[0] * n) + 1)
    tail_start = min(n - 1, int(TAIL_QUANTILE * n))

    def mean_stages(group):
        return {name: sum(s[name] for _, s in group) / len(group) for name, _, _ in STAGES}

    gaps = [g for r, _ in complete for g in r.send_gaps()]
    return {"requests": n, "ttft_p50_ms": _quantile(ttfts, 0.5), "ttft_p99_ms": _quantile(ttfts, TAIL_QUANTILE),
            "median": mean_stages(complete[lo:hi]), "tail": mean_stages(complete[tail_start:]),
            "send_gap_p50_ms": _quantile(gaps, 0.5) if gaps else 0.0,
            "send_gap_p99_ms": _quantile(gaps, TAIL_QUANTILE) if gaps else 0.0}


def plot(requests: list[RequestTimes], summary: dict, png_path: str, title: str = "",
         steps: Optional[list[Step]] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r.http_request, r.stages()) for r in requests]
    rows = [(i, s) for i, s in rows if s is not None]
    if steps:
        fig = plt.figure(figsize=(13, 8.5))
        grid = fig.add_gridspec(2, 2, width_ratios=[3, 1], height_ratios=[5.5, 3])
        ax, ax2, ax3 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
        points = ax3.scatter([st.t_start for st in steps], [st.duration for st in steps],
                             c=[st.num_prefill_tokens for st in steps], s=4, cmap="viridis")
        fig.colorbar(points, ax=ax3, label="prefill tokens in the step")
        ax3.set_xlabel("ms since the server's first arrival")
        ax3.set_ylabel("engine step (ms)")
        ax3.set_yscale("log")
    else:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 1]})
    left = [0.0] * len(rows)
    for (name, _, _), color in zip(STAGES, STAGE_COLORS):
        widths = [s[name] for _, s in rows]
        ax.barh([i for i, _ in rows], widths, left=left, height=1.0, color=color, label=name, linewidth=0)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms from arrival to first token sent")
    ax.set_ylabel("request (arrival order)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"TTFT by stage, {summary['requests']} requests")
    groups = (("median req.", summary["median"]), (f"p{round(100 * TAIL_QUANTILE)} tail", summary["tail"]))
    for x, (label, stages) in enumerate(groups):
        bottom = 0.0
        for (name, _, _), color in zip(STAGES, STAGE_COLORS):
            ax2.bar(x, stages[name], bottom=bottom, color=color, width=0.6)
            bottom += stages[name]
        ax2.annotate(f"{bottom:,.0f} ms", (x, bottom), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks([0, 1], [g[0] for g in groups])
    ax2.set_ylabel("mean ms")
    ax2.set_title(f"TTFT p50 {summary['ttft_p50_ms']:,.0f} / p99 {summary['ttft_p99_ms']:,.0f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def format_summary(s: dict, steps: Optional[dict] = None) -> str:
    lines = [f"{s['requests']} requests: TTFT p50 {s['ttft_p50_ms']:.1f} ms, p99 {s['ttft_p99_ms']:.1f} ms; "
             f"gaps between chunks sent p50 {s['send_gap_p50_ms']:.2f} ms, p99 {s['send_gap_p99_ms']:.2f} ms",
             f"{'stage (mean ms)':<12}{'median':>10}{'p99 tail':>10}"]
    for name, _, _ in STAGES:
        lines.append(f"{name:<12}{s['median'][name]:>10.1f}{s['tail'][name]:>10.1f}")
    for name, st in (steps or {}).items():
        lines.append(f"{name} steps: {st['steps']}, duration p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="timeline CSV written by `nanovllm serve --request-timeline`")
    p.add_argument("--png", default=None, help="plot path (default: the CSV's path with .png)")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--skip-first", type=int, default=0, metavar="N",
                   help="leave out the first N HTTP requests, and the steps before the next one arrived (a warm-up)")


def run(args) -> int:
    if not os.path.isfile(args.csv):
        raise ValueError(f"{args.csv} does not exist: write one with `nanovllm serve --request-timeline PATH`")
    if args.skip_first < 0:
        raise ValueError(f"--skip-first {args.skip_first}: give a count >= 0")
    requests = load(args.csv, args.skip_first)
    if not requests:
        raise ValueError(f"{args.csv} has no request after the first {args.skip_first}")
    summary = breakdown(requests)
    start = min((r.events["arrival"] for r in requests if "arrival" in r.events), default=float("-inf"))
    steps = load_steps(args.csv, since_ms=start)
    print(format_summary(summary, step_summary(steps) if steps else None))
    png = plot(requests, summary, args.png or os.path.splitext(args.csv)[0] + ".png", args.title, steps)
    print(f"saved {png}")
    return 0
