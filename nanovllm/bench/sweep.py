"""Prompt-length and batch-size sweep, RMSNorm+linear fusion on and off, with peak GPU memory.

Grid (per model): (1) prompt lengths --prompt-lens at batches --prompt-batches (default 128..4096
at batch 1 and 16); (2) batches --batches at prompt --batch-prompt-len (default 1..64 at 512).
Each point: B requests of P random prompt tokens (different for every request and point), all
submitted at once, --output-len greedy tokens each (ignore_eos). One warm-up of the same shape
with other tokens runs first (Triton compiles, allocator), then the measured run:

  ttft_ms         mean over the requests of submit -> first token
  decode_tok_s    tokens delivered after the last request's first token / the time from then
                  to the end (batch 1: (output_len - 1) / decode time, as `bench latency`)
  e2e_s           submit -> last token of the batch
  peak_*_gib      torch.cuda.max_memory_allocated / max_memory_reserved over the measured run
                  (peak stats reset per point; KV cache and weights included, as the engine
                  holds them), act_peak_gib = the allocated peak above what was allocated
                  before the run; empty on CPU

Fusion: one engine per (model, fuse_gemv_prologues) setting, reused for all points, built one
after another (each KV cache sized for the grid's largest point, prefix caching off so no point
reads another's blocks). The fused prologue only runs where the decode GEMMs take the Triton
skinny GEMM (<= 8 rows, where calibration found it faster than cuBLAS): from batch 16 on both
settings run the same kernels, and their difference is the run-to-run noise.

    nanovllm bench sweep                                   # both models, full grid (H200: ~5-7 min)
    nanovllm bench sweep --models qwen3-0.6b               # one model (a config dir or a name below)
    nanovllm bench sweep --models DIR --device cpu --prompt-lens 8,16 --prompt-batches 1,2 \\
        --batches 1,3 --batch-prompt-len 8 --output-len 4  # CPU smoke run on a tiny model

Rows are appended to benchmarks/results/sweep.csv (device, date, commit in each); one PNG per model
(sweep_<model>.png): TTFT, end-to-end latency, decode tokens/s and peak memory against prompt
length and batch size, fused (solid) and unfused (dashed) on the same axes.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass

from nanovllm import envs
from nanovllm.bench import engines
from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row
from nanovllm.cli.args import add_quantization_args, quantization_kwargs
from nanovllm.config import DEFAULT_BLOCK_SIZE

CONFIG_DIR = os.path.join(os.path.dirname(RESULTS_DIR), "configs")
DEFAULT_MODELS = ("qwen3-0.6b", "qwen3-8b")
DEFAULT_PROMPT_LENS = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_PROMPT_BATCHES = (1, 16)
DEFAULT_BATCHES = (1, 4, 8, 16, 32, 64)
DEFAULT_BATCH_PROMPT_LEN = 512
DEFAULT_OUTPUT_LEN = 128
WARMUP_OUTPUT_LEN = 2  # the warm-up's generated tokens: one prefill, one decode step
MODEL_LEN_SLACK = 16  # max_model_len above the longest prompt + output
TOKEN_ID_MAX = 10000
GIB = 2**30
FIELDS = ("model", "quantization", "fused", "grid", "batch", "prompt_len", "output_len", "output_tokens", "ttft_ms",
          "decode_tok_s", "e2e_s", "peak_alloc_gib", "peak_reserved_gib", "act_peak_gib", "cuda_graphs")


@dataclass(frozen=True)
class Point:
    grid: str  # "prompt" (prompt-length sweep) or "batch" (batch-size sweep)
    batch: int
    prompt_len: int


def grid_points(prompt_lens, prompt_batches, batches, batch_prompt_len: int) -> list[Point]:
    """The two sweeps' points; one shared by both (e.g. batch 16 at prompt 512) is run once, under "prompt"."""
    points = [Point("prompt", b, p) for b in prompt_batches for p in prompt_lens]
    seen = {(q.batch, q.prompt_len) for q in points}
    points += [Point("batch", b, batch_prompt_len) for b in batches if (b, batch_prompt_len) not in seen]
    return points


def int_list(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8] (argparse type: positive ints, comma-separated)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,4,8, got {text!r}")
    return values


def model_dir(name: str) -> str:
    """A model directory as given, or one of benchmarks/configs/ by name."""
    if os.path.isdir(name):
        return name
    candidate = os.path.join(CONFIG_DIR, name)
    if os.path.isdir(candidate):
        return candidate
    raise ValueError(f"--models: {name!r} is neither a directory nor one of {sorted(os.listdir(CONFIG_DIR))} "
                     f"in {CONFIG_DIR}")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated model dirs or names in benchmarks/configs/ "
                        f"(default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--prompt-lens", type=int_list, default=list(DEFAULT_PROMPT_LENS),
                   help="prompt-length sweep (default 128,256,512,1024,2048,4096)")
    p.add_argument("--prompt-batches", type=int_list, default=list(DEFAULT_PROMPT_BATCHES),
                   help="batch sizes of the prompt-length sweep (default 1,16)")
    p.add_argument("--batches", type=int_list, default=list(DEFAULT_BATCHES),
                   help="batch-size sweep (default 1,4,8,16,32,64)")
    p.add_argument("--batch-prompt-len", type=int, default=DEFAULT_BATCH_PROMPT_LEN,
                   help=f"prompt length of the batch-size sweep (default {DEFAULT_BATCH_PROMPT_LEN})")
    p.add_argument("--output-len", type=int, default=DEFAULT_OUTPUT_LEN,
                   help=f"generated tokens per request (default {DEFAULT_OUTPUT_LEN})")
    p.add_argument("--fusion", choices=("both", "on", "off"), default="both",
                   help="fuse_gemv_prologues settings to run (default both, same run)")
    p.add_argument("--load-format", default="dummy", help="dummy = random weights (default), auto = the checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    add_quantization_args(p)
    p.add_argument("--result-dir", default=RESULTS_DIR, help="where sweep.csv and sweep_<model>.png go")
    p.add_argument("--no-plot", action="store_true", help="CSV only")


def check(args) -> None:
    """Refused before any model loads (ValueError)."""
    if args.output_len < WARMUP_OUTPUT_LEN:
        raise ValueError(f"--output-len must be at least {WARMUP_OUTPUT_LEN} (a first token and a decode), "
                         f"got {args.output_len}")
    if args.batch_prompt_len < 1:
        raise ValueError(f"--batch-prompt-len must be positive, got {args.batch_prompt_len}")
    if envs.NANOVLLM_GEMV_FUSE.get() not in (None, ""):
        raise ValueError("NANOVLLM_GEMV_FUSE is set: it would override both fusion settings of the sweep; unset it "
                         "(use --fusion on|off to run one setting)")
    for name in args.models.split(","):
        model_dir(name.strip())


def _tokens(rng: random.Random, n: int, high: int) -> list[int]:
    return [rng.randint(1, high) for _ in range(n)]


def measure_point(llm, point: Point, output_len: int, seed: int) -> dict:
    """One measured run of `point` on a warm engine (module docstring: what each field means)."""
    from nanovllm import RequestOutputKind, SamplingParams

    engine = llm.engine
    high = min(TOKEN_ID_MAX, engine.hf_config.vocab_size - 1)
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": _tokens(rng, point.prompt_len, high)} for _ in range(point.batch)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    memory = _MemoryWindow()
    run = engines.timed_run(engine, [(f"sweep-{seed}-{i}", p) for i, p in enumerate(prompts)], params)
    return {"output_tokens": run.output_tokens,
            "ttft_ms": round(1000 * sum(t - run.start for t in run.first.values()) / len(run.first), 3),
            "decode_tok_s": round(run.decode_tok_per_s(), 1),
            "e2e_s": round(run.end - run.start, 4), **memory.read()}


class _MemoryWindow:
    """Peak CUDA memory from construction to read() (empty fields without CUDA)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()

    def read(self) -> dict:
        if not self.cuda:
            return {"peak_alloc_gib": "", "peak_reserved_gib": "", "act_peak_gib": ""}
        import torch

        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        return {"peak_alloc_gib": round(peak / GIB, 3), "peak_reserved_gib": round(reserved / GIB, 3),
                "act_peak_gib": round((peak - self.start) / GIB, 3)}


def kv_blocks(points: list[Point], output_len: int, max_model_len: int) -> int:
    """KV blocks for the largest point (not max batch x longest prompt, which no point runs) and spares."""
    per_point = max(p.batch * -(-(p.prompt_len + output_len) // DEFAULT_BLOCK_SIZE) for p in points)
    return per_point + engines.SPARE_SEQUENCES * -(-max_model_len // DEFAULT_BLOCK_SIZE)


def sweep_model(args, model: str, points: list[Point], fused: bool) -> list[dict]:
    """Every point on one engine with fuse_gemv_prologues=fused; rows as they go into the CSV."""
    max_len = max(p.prompt_len for p in points) + args.output_len + MODEL_LEN_SLACK
    max_seqs = max(p.batch for p in points)
    llm = engines.workload_llm(model, max_len, max_seqs, load_format=args.load_format, device=args.device,
                               dtype=args.dtype, num_kv_blocks=kv_blocks(points, args.output_len, max_len),
                               enforce_eager=args.enforce_eager, enable_prefix_caching=False, fuse_gemv_prologues=fused,
                               **quantization_kwargs(args))
    name = os.path.basename(os.path.normpath(model))
    graphs = llm.engine.executor.info.cuda_graphs
    rows = []
    try:
        for i, point in enumerate(points):
            measure_point(llm, point, WARMUP_OUTPUT_LEN, seed=2 * i)  # same shapes, other tokens
            r = measure_point(llm, point, args.output_len, seed=2 * i + 1)
            rows.append({"model": name, "quantization": args.quantization or "", "fused": fused, "grid": point.grid,
                         "batch": point.batch, "prompt_len": point.prompt_len, "output_len": args.output_len, **r,
                         "cuda_graphs": graphs})
            print(f"{name} fused={fused!s:5} B={point.batch:<3} P={point.prompt_len:<5} TTFT {r['ttft_ms']:9.2f} ms  "
                  f"decode {r['decode_tok_s']:10,.1f} tok/s  e2e {r['e2e_s']:7.3f} s  "
                  f"peak {r['peak_alloc_gib'] or '-'} GiB", flush=True)
    finally:
        engines.release(llm)
    return rows


def run(args) -> int:
    from nanovllm.bench.sweep_plot import plot_model

    check(args)
    points = grid_points(args.prompt_lens, args.prompt_batches, args.batches, args.batch_prompt_len)
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.fusion]
    csv_path = os.path.join(args.result_dir, "sweep.csv")
    t_start = time.perf_counter()
    for name in args.models.split(","):
        model = model_dir(name.strip())
        base = base_row()
        rows = []
        for fused in settings:  # CSV rows and plot after each setting: a run cut short keeps what it measured
            part = sweep_model(args, model, points, fused)
            csv_path = append_rows(csv_path, [{**base, **{f: r[f] for f in FIELDS}} for r in part])
            rows += part
            if not args.no_plot:
                png = plot_model(rows, os.path.join(args.result_dir, f"sweep_{rows[0]['model']}.png"),
                                 f"{rows[0]['model']} ({base['device']}, {base['commit']}, {base['date']} UTC)")
                print(f"plot: {png}")
    print(f"sweep: {len(points)} points x {len(settings)} fusion settings per model in "
          f"{time.perf_counter() - t_start:.0f} s (CSV: {csv_path})")
    return 0
