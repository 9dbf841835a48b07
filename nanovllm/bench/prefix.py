"""Prefix caching, cascade attention and chunked prefill, measured on random weights.

(a) throughput: --num-requests requests sharing a --prefix-len system prompt plus
    --unique-len tokens each, --output-len greedy tokens (ignore_eos), all arriving at once
    after one earlier request carried the system prompt (as on a server that has been up:
    with caching, the prompt is in the cache), on three engines: prefix caching + cascade
    attention, caching alone, both off. Output
    tokens/s of the whole run; decode tokens/s = tokens delivered after the last request's
    first token / the time from then to the end; prefix-cache hit rate of the timed run.
(b) time to first token of a request whose --prefix-len prefix is cached (a request with
    the same prefix ran before) vs one whose prefix is new: median of --ttft-repeats pairs,
    on the chunked-prefill engine of (c).
(c) inter-token gaps: --num-decodes requests (prompts of --decode-prompt-len tokens) are
    decoding when a --long-prompt-len prompt arrives. Worst and median gap between
    consecutive tokens of the decodes in a window of --gap-steps-before steps before the
    arrival and --gap-steps-after steps from it on, with chunked prefill (the long prompt
    spread over steps of at most --prefill-cap prompt tokens while others decode) vs
    without it (the long prompt in one step).

    nanovllm bench prefix --model benchmarks/configs/qwen3-0.6b
    nanovllm bench prefix --model DIR --device cpu --num-requests 4 --prefix-len 64 ...   # CI smoke

Every engine is built from the config with random weights (--load-format dummy); a warm-up
of the same shape with other tokens runs before each timed part. One CSV row per engine and
part (benchmarks/results/prefix.csv) and one PNG of the three parts (prefix.png).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from nanovllm.bench.engines import drive as _drive
from nanovllm.bench.engines import release as _release
from nanovllm.bench.engines import step as _step
from nanovllm.bench.engines import timed_run as _timed_run
from nanovllm.bench.engines import workload_llm
from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row
from nanovllm.cli.args import add_quantization_args, quantization_kwargs
from nanovllm.config import DEFAULT_MAX_NUM_BATCHED_TOKENS

TOKEN_ID_MAX = 10000
THROUGHPUT_MODES = {  # mode -> (enable_prefix_caching, cascade_attention or None = --cascade-mode)
    "cache+cascade": (True, None),
    "cache": (True, "off"),
    "none": (False, "off"),
}
FIELDS = ("part", "mode", "seconds", "output_tok_per_s", "decode_tok_per_s", "prefix_hit_rate", "cached_tokens",
          "ttft_ms", "worst_gap_ms", "median_gap_ms", "gap_ratio", "cascade_steps", "graph_replays")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model dir (a config.json is enough with --load-format dummy)")
    p.add_argument("--load-format", default="dummy", help="dummy = random weights (default), auto = the checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--parts", default="a,b,c", help="which parts to run, comma-separated (default a,b,c)")
    p.add_argument("--num-requests", type=int, default=64, help="(a) requests sharing the prefix (default 64)")
    p.add_argument("--prefix-len", type=int, default=2048, help="(a, b) shared prefix tokens (default 2048)")
    p.add_argument("--unique-len", type=int, default=64, help="(a, b) tokens after the prefix (default 64)")
    p.add_argument("--output-len", type=int, default=128, help="(a) generated tokens per request (default 128)")
    p.add_argument("--cascade-mode", choices=("auto", "force"), default="auto",
                   help="cascade_attention of the cache+cascade engine (default auto; force for tiny smoke runs)")
    p.add_argument("--ttft-repeats", type=int, default=5, help="(b) cached / uncached pairs (default 5)")
    p.add_argument("--num-decodes", type=int, default=32, help="(c) requests decoding (default 32)")
    p.add_argument("--decode-prompt-len", type=int, default=1024, help="(c) their prompts (default 1024)")
    p.add_argument("--gap-steps-before", type=int, default=32,
                   help="(c) steps of the measured window before the long prompt arrives (default 32)")
    p.add_argument("--gap-steps-after", type=int, default=96,
                   help="(c) steps of the window from its arrival on (default 96; its prefill must fit)")
    p.add_argument("--long-prompt-len", type=int, default=4000, help="(c) the prompt that arrives (default 4000)")
    p.add_argument("--prefill-cap", type=int, default=128,
                   help="(b, c) max_prefill_tokens_while_decoding of the chunked engine (default 128)")
    p.add_argument("--result-dir", default=RESULTS_DIR, help="where prefix.csv / prefix.png go")
    add_quantization_args(p)


_token_high = [TOKEN_ID_MAX]  # lowered to the model's vocabulary by _make_llm


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(1, _token_high[0]) for _ in range(n)]


def _make_llm(args, max_model_len: int, max_num_seqs: int, **kw):
    """An engine whose KV cache holds its workload (bench/engines.py)."""
    llm = workload_llm(args.model, max_model_len, max_num_seqs, load_format=args.load_format, device=args.device,
                       dtype=args.dtype, **quantization_kwargs(args), **kw)
    _token_high[0] = min(TOKEN_ID_MAX, llm.engine.hf_config.vocab_size - 1)
    return llm


def _counters(llm) -> tuple[int, int, int, int]:
    """(prefix-cache queries, hits, cascade steps, graph replays) so far."""
    runner = llm.engine.executor.worker.runner
    graphs = runner.cuda_graphs
    replays = sum(graphs.num_replays.values()) if graphs is not None else 0
    return llm.engine.kv.prefix_queries, llm.engine.kv.prefix_hits, runner.num_cascade_steps, replays


# ---------------------------------------------------------------------- (a) throughput
def _shared_prompts(args, seed: int) -> tuple[list[int], list[dict]]:
    rng = random.Random(seed)
    prefix = _random_tokens(rng, args.prefix_len)
    return prefix, [{"prompt_token_ids": prefix + _random_tokens(rng, args.unique_len)}
                    for _ in range(args.num_requests)]


def _throughput_run(llm, args, seed: int, output_len: int) -> dict:
    from nanovllm import RequestOutputKind, SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    prefix, prompts = _shared_prompts(args, seed)
    engine.add_request(f"system-{seed}", {"prompt_token_ids": prefix}, SamplingParams(temperature=0, max_tokens=1))
    _drive(engine)  # the system prompt has been seen before (untimed)
    q0, h0, c0, r0 = _counters(llm)
    run = _timed_run(engine, [(f"tput-{seed}-{i}", p) for i, p in enumerate(prompts)], params)
    q1, h1, c1, r1 = _counters(llm)
    seconds = run.end - run.start
    return {"seconds": round(seconds, 3), "output_tok_per_s": round(run.output_tokens / seconds, 1),
            "decode_tok_per_s": round(run.decode_tok_per_s(), 1),
            "prefix_hit_rate": round((h1 - h0) / max(q1 - q0, 1), 4), "cascade_steps": c1 - c0,
            "graph_replays": r1 - r0}


def part_a(args) -> list[dict]:
    rows = []
    max_len = args.prefix_len + args.unique_len + args.output_len + 16
    for mode, (caching, cascade) in THROUGHPUT_MODES.items():
        llm = _make_llm(args, max_len, args.num_requests, enable_prefix_caching=caching,
                        cascade_attention=cascade or args.cascade_mode)
        _throughput_run(llm, args, seed=1, output_len=min(8, args.output_len))  # warm-up: other tokens, same shapes
        row = _throughput_run(llm, args, seed=2, output_len=args.output_len)
        rows.append({"part": "a", "mode": mode, **row})
        print(f"(a) {mode:14s} {row['output_tok_per_s']:>10,.1f} output tok/s  {row['decode_tok_per_s']:>10,.1f} "
              f"decode tok/s  {row['seconds']:.2f} s  prefix-cache hit rate {row['prefix_hit_rate']:.1%}  "
              f"cascade steps {row['cascade_steps']}")
        _release(llm)
    return rows


# ---------------------------------------------------------------------- (b) time to first token
def _ttft(engine, rid: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds from add_request to the step that returns the first token, and the cached prompt tokens."""
    from nanovllm import SamplingParams

    got = {}

    def on_tokens(out, n, now):
        got.setdefault(out.request_id, (now, out.num_cached_tokens))

    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1))
    _drive(engine, on_tokens, until=lambda: rid in got)
    _drive(engine)
    return got[rid][0] - t0, got[rid][1]


def part_b(llm, args) -> list[dict]:
    rng = random.Random(3)
    engine = llm.engine
    times = {"uncached": [], "cached": []}
    cached_tokens = {"uncached": [], "cached": []}
    for rep in range(args.ttft_repeats + 1):  # the first pair warms up
        prefix = _random_tokens(rng, args.prefix_len)
        for mode in ("uncached", "cached"):  # the first request caches the prefix for the second
            t, cached = _ttft(engine, f"ttft-{rep}-{mode}", prefix + _random_tokens(rng, args.unique_len))
            if rep:
                times[mode].append(t)
                cached_tokens[mode].append(cached)
    rows = []
    for mode in ("uncached", "cached"):
        ms = statistics.median(times[mode]) * 1000
        rows.append({"part": "b", "mode": mode, "ttft_ms": round(ms, 3), "cached_tokens": min(cached_tokens[mode])})
    ratio = rows[0]["ttft_ms"] / max(rows[1]["ttft_ms"], 1e-9)
    print(f"(b) TTFT, {args.prefix_len}-token prefix: uncached {rows[0]['ttft_ms']:.2f} ms, cached "
          f"{rows[1]['ttft_ms']:.2f} ms ({rows[1]['cached_tokens']} tokens from the cache) -> {ratio:.1f}x faster")
    return rows


# ---------------------------------------------------------------------- (c) inter-token gaps
def _gap_run(llm, args, seed: int, steps_before: int, steps_after: int) -> dict:
    """Decodes run; `steps_before` steps after the last of them started, the long prompt arrives;
    `steps_after` steps after that the window closes. Gaps: consecutive tokens of the decodes in it."""
    from nanovllm import RequestOutputKind, SamplingParams

    engine = llm.engine
    rng = random.Random(seed)
    max_tokens = engine.max_model_len - args.decode_prompt_len  # they outlive the window
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    arrivals: dict[str, list[float]] = {}

    def on_tokens(out, n, now):
        arrivals.setdefault(out.request_id, []).extend([now] * n)

    decodes = [f"dec-{seed}-{i}" for i in range(args.num_decodes)]
    for rid in decodes:
        engine.add_request(rid, {"prompt_token_ids": _random_tokens(rng, args.decode_prompt_len)}, params)
    _drive(engine, on_tokens, until=lambda: all(r in arrivals for r in decodes))
    window_start = time.perf_counter()
    for _ in range(steps_before):
        _step(engine, on_tokens)
    _, _, c0, r0 = _counters(llm)
    long_id = f"long-{seed}"
    t_arrival = time.perf_counter()
    engine.add_request(long_id, {"prompt_token_ids": _random_tokens(rng, args.long_prompt_len)},
                       SamplingParams(temperature=0, max_tokens=1))
    for _ in range(steps_after):
        _step(engine, on_tokens)
    _, _, c1, r1 = _counters(llm)
    engine.abort_request(decodes)
    _drive(engine)
    if long_id not in arrivals:
        raise RuntimeError(f"the {args.long_prompt_len}-token prompt did not finish within {steps_after} steps: "
                           "raise --gap-steps-after")
    gaps = [b - a for rid in decodes for a, b in zip(arrivals[rid], arrivals[rid][1:]) if a >= window_start]
    worst, median = max(gaps) * 1000, statistics.median(gaps) * 1000
    return {"worst_gap_ms": round(worst, 3), "median_gap_ms": round(median, 3), "gap_ratio": round(worst / median, 2),
            "ttft_ms": round((arrivals[long_id][0] - t_arrival) * 1000, 3), "cascade_steps": c1 - c0,
            "graph_replays": r1 - r0}


def _chunked_engine(args):
    max_len = max(args.long_prompt_len, args.decode_prompt_len + args.gap_steps_before + args.gap_steps_after,
                  args.prefix_len + args.unique_len) + 16
    return _make_llm(args, max_len, args.num_decodes + 1, max_prefill_tokens_while_decoding=args.prefill_cap)


def part_c(args, chunked_llm) -> list[dict]:
    rows = []
    for mode in ("chunked", "unchunked"):
        llm = chunked_llm if mode == "chunked" else _make_llm(
            args, chunked_llm.engine.max_model_len, args.num_decodes + 1, enable_chunked_prefill=False,
            max_num_batched_tokens=max(DEFAULT_MAX_NUM_BATCHED_TOKENS, args.long_prompt_len + args.num_decodes))
        _gap_run(llm, args, seed=10, steps_before=2, steps_after=args.gap_steps_after)  # warm-up, other tokens
        row = _gap_run(llm, args, seed=11, steps_before=args.gap_steps_before, steps_after=args.gap_steps_after)
        rows.append({"part": "c", "mode": mode, **row})
        print(f"(c) {mode:9s} worst gap {row['worst_gap_ms']:.2f} ms, median {row['median_gap_ms']:.2f} ms "
              f"-> {row['gap_ratio']:.2f}x; the long prompt's first token after {row['ttft_ms']:.1f} ms")
        if llm is not chunked_llm:
            _release(llm)
    return rows


# ---------------------------------------------------------------------- report
def plot(rows: list[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in "abc" if any(r["part"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.6 * len(parts), 3.8), squeeze=False)
    for ax, part in zip(axes[0], parts):
        sel = [r for r in rows if r["part"] == part]
        labels = [r["mode"] for r in sel]
        if part == "a":
            series = [("output tok/s", "output_tok_per_s"), ("decode tok/s", "decode_tok_per_s")]
            ax.set_title("(a) shared-prompt throughput", fontsize=10)
        elif part == "b":
            series = [("TTFT ms", "ttft_ms")]
            ax.set_title("(b) time to first token", fontsize=10)
        else:
            series = [("worst gap ms", "worst_gap_ms"), ("median gap ms", "median_gap_ms")]
            ax.set_title("(c) decode gaps, long prompt arrives", fontsize=10)
        width = 0.8 / len(series)
        for k, (name, key) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(sel))]
            vals = [float(r[key]) for r in sel]
            bars = ax.bar(xs, vals, width, label=name)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:,.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b", "c"}:
        raise ValueError(f"--parts takes a comma-separated subset of a,b,c, got {args.parts!r}")
    for name in ("num_requests", "prefix_len", "unique_len", "output_len", "ttft_repeats", "num_decodes",
                 "decode_prompt_len", "gap_steps_after", "long_prompt_len", "prefill_cap"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.gap_steps_before < 0:
        raise ValueError("--gap-steps-before must be >= 0")
    model = os.path.basename(os.path.normpath(args.model))
    base = {**base_row(), "model": model}
    config = {"num_requests": args.num_requests, "prefix_len": args.prefix_len, "unique_len": args.unique_len,
              "output_len": args.output_len, "cascade_mode": args.cascade_mode, "num_decodes": args.num_decodes,
              "decode_prompt_len": args.decode_prompt_len, "long_prompt_len": args.long_prompt_len,
              "prefill_cap": args.prefill_cap}
    csv_path = os.path.join(args.result_dir, "prefix.csv")
    rows = []

    def save(part_rows):  # each part's rows as soon as it is done (a run cut short keeps them)
        nonlocal csv_path
        rows.extend(part_rows)
        csv_path = append_rows(csv_path, [{**base, **{f: r.get(f, "") for f in FIELDS}, **config} for r in part_rows])

    if "a" in parts:
        save(part_a(args))
    if parts & {"b", "c"}:
        chunked = _chunked_engine(args)
        if "b" in parts:
            save(part_b(chunked, args))
        if "c" in parts:
            save(part_c(args, chunked))
        _release(chunked)
    png = plot(rows, os.path.join(args.result_dir, "prefix.png"), f"bench prefix, {model} ({base['device']})")
    by = {(r["part"], r["mode"]): r for r in rows}
    if "a" in parts:
        both, cache, none = by[("a", "cache+cascade")], by[("a", "cache")], by[("a", "none")]
        print(f"(a) caching + cascade vs both off: {both['output_tok_per_s'] / none['output_tok_per_s']:.2f}x "
              f"throughput; cascade vs caching alone: {both['decode_tok_per_s'] / cache['decode_tok_per_s']:.2f}x "
              "decode speed")
    print(f"saved {csv_path} and {png}")
    return 0
