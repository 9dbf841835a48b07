"""Offline throughput on nano-vLLM's bench.py workload.

256 sequences, `random.seed(0)`, prompt token ids drawn with randint(0, 10000), prompt lengths
randint(100, 1024), output lengths randint(100, 1024), ignore_eos, temperature 0.6,
max_model_len 4096. Throughput = total output tokens / wall time of one `generate` call.
The model is built from a config JSON with random weights (nothing to download).

    nanovllm bench throughput --model benchmarks/configs/qwen3-0.6b
    nanovllm bench throughput --model benchmarks/configs/qwen3-0.6b --backend hf --num-seqs 64
    nanovllm bench throughput --model benchmarks/configs/qwen3-0.6b --kv-cache-dtype fp8 --timeline

`--timeline` records every step of the timed run (kind, batch, tokens, GPU time, host gap, bytes,
the step's floor) to <csv stem>_timeline_<commit>.csv with a plot, and prints where the time
above the floor goes (nanovllm/bench/step_timeline.py).

`--workload serve` replays `nanovllm bench serve`'s workload instead (same flags, same seed: the
same requests, arrival pattern and concurrency cap) through the engine without HTTP, and appends
a `bench=replay` row to serve.csv (see nanovllm/bench/replay.py).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from nanovllm.bench import step_timeline as timeline
from nanovllm.bench.report import RESULTS_DIR, append_rows, bar_plot, base_row, git_commit
from nanovllm.cli.args import add_parallel_args, add_quantization_args, parallel_kwargs, quantization_kwargs

WORKLOAD_SEED = 0
TOKEN_ID_MAX = 10000
MIN_LEN, MAX_LEN = 100, 1024
TEMPERATURE = 0.6


def make_workload(num_seqs: int, max_input_len: int = MAX_LEN, max_output_len: int = MAX_LEN):
    """The exact draw order of nano-vLLM's bench.py: all prompts first, then all output lengths."""
    random.seed(WORKLOAD_SEED)
    prompts = [[random.randint(0, TOKEN_ID_MAX) for _ in range(random.randint(MIN_LEN, max_input_len))]
               for _ in range(num_seqs)]
    output_lens = [random.randint(MIN_LEN, max_output_len) for _ in range(num_seqs)]
    return prompts, output_lens


def add_args(p: argparse.ArgumentParser) -> None:
    from nanovllm.bench.workload import PROMPT_KINDS, add_workload_args

    p.add_argument("--model", required=True, help="model dir (a config.json is enough with --load-format dummy)")
    p.add_argument("--workload", choices=("nanovllm", "serve"), default="nanovllm",
                   help="nanovllm = nano-vLLM's bench.py workload (default); serve = bench serve's workload "
                        "(--num-prompts, --input-len, ... below), replayed without HTTP")
    p.add_argument("--backend", choices=["nanovllm", "hf"], default="nanovllm")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=MAX_LEN,
                   help=f"longest prompt; lengths are drawn from [{MIN_LEN}, this] (at least {MIN_LEN})")
    p.add_argument("--max-output-len", type=int, default=MAX_LEN,
                   help=f"longest output; lengths are drawn from [{MIN_LEN}, this] (at least {MIN_LEN})")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--load-format", default="dummy", help="dummy = random weights (default), auto = load the checkpoint")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_const", const=False,
                   help="wait for each step's tokens before scheduling the next (the baseline for A/B runs)")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    add_parallel_args(p)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8 (e4m3, twice the tokens)")
    p.add_argument("--decode-split", default="uniform", choices=["uniform", "balanced"],
                   help="decode attention work split: uniform, or balanced per request (mixed context lengths)")
    p.add_argument("--timeline", action="store_true",
                   help="record a per-step timeline of the timed run: CSV, plot and a summary of time above the floor")
    p.add_argument("--bandwidth-gbs", type=float, default=timeline.H200_BANDWIDTH / 1e9,
                   help="memory bandwidth for the timeline's floor in GB/s (default: H200's measured copy rate)")
    p.add_argument("--peak-tflops", type=float, default=timeline.H200_PEAK_FLOPS / 1e12,
                   help="GEMM peak for the timeline's floor in TFLOP/s (default: H200 bf16, measured)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None,
                   help="scheduling policy: most prompt tokens computed per step (default: no cap)")
    p.add_argument("--csv", default=None, help="default benchmarks/results/throughput.csv (serve.csv for --workload serve)")
    g = p.add_argument_group("--workload serve (the flags of `nanovllm bench serve`)")
    add_workload_args(g)
    g.add_argument("--prompt-kind", choices=PROMPT_KINDS, default="tokens",
                   help="tokens (no tokenizer needed) or text (needs the model's tokenizer) (default tokens)")
    g.add_argument("--label", default="", help="free text stored in the CSV row")
    g.add_argument("--no-save", action="store_true", help="print only; write no CSV/PNG")
    add_quantization_args(p)


def check(args) -> None:
    """Flag values the workload cannot use, refused before any model loads (ValueError)."""
    for flag, value in (("--max-input-len", args.max_input_len), ("--max-output-len", args.max_output_len)):
        if value < MIN_LEN:
            raise ValueError(f"{flag} {value} is below the workload's minimum of {MIN_LEN} tokens (lengths are "
                             f"drawn from [{MIN_LEN}, {flag}]): use {MIN_LEN} or more")
    if args.num_seqs <= 0:
        raise ValueError(f"--num-seqs must be positive, got {args.num_seqs}")
    if args.max_input_len + args.max_output_len > args.max_model_len:
        raise ValueError(f"--max-input-len {args.max_input_len} + --max-output-len {args.max_output_len} exceed "
                         f"--max-model-len {args.max_model_len}: raise --max-model-len or lower the lengths")


WARMUP_SEQS = 32
WARMUP_OUTPUT_TOKENS = 16


def warm_up(llm, max_input_len: int = MAX_LEN) -> None:
    """Compile every Triton kernel variant the timed run will meet, outside the timing.

    Triton JIT-compiles a kernel per specialization (dtypes, constexprs, which integer
    arguments are 1 or multiples of 16), on first use; on a machine with a cold Triton
    cache the workload's first prefills and sampling steps paid ~0.5 s of compiles. The
    warm-up runs its own small, different workload (32 random prompts of 1..max_input_len
    tokens, 16 tokens each, the benchmark's temperature) through the same paths.
    """
    from nanovllm import SamplingParams

    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randint(0, TOKEN_ID_MAX) for _ in range(rng.randint(1, max_input_len))]}
               for _ in range(WARMUP_SEQS)]
    params = SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=WARMUP_OUTPUT_TOKENS)
    llm.generate(prompts, params, use_tqdm=False)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)


def run_nanovllm(args, prompts, output_lens) -> float:
    """Seconds for the workload; sets args.async_scheduling and args.pdl to what the engine resolved."""
    from nanovllm import LLM, SamplingParams

    kwargs = quantization_kwargs(args)
    for name in ("max_num_batched_tokens", "max_num_seqs", "max_prefill_tokens_while_decoding"):
        if getattr(args, name, None):
            kwargs[name] = getattr(args, name)
    llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype, decode_split=args.decode_split,
              step_timeline=args.timeline,
              async_scheduling=args.async_scheduling, gpu_memory_utilization=args.gpu_memory_utilization,
              **parallel_kwargs(args), **kwargs)
    args.async_scheduling = llm.engine.async_scheduling  # what auto resolved to, for the CSV
    args.cuda_graphs = llm.engine.executor.info.cuda_graphs  # as it really ran (never on CPU)
    args.pdl = llm.engine.config.pdl
    args.tp, args.executor = llm.engine.config.tensor_parallel_size, llm.engine.config.executor_backend
    warm_up(llm, args.max_input_len)
    recorder = step_timeline(llm) if args.timeline else None
    if recorder is not None:
        recorder.reset()  # the warm-up's steps are not the workload's
    params = [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=n) for n in output_lens]
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=args.progress)
    elapsed = time.perf_counter() - t0
    if llm.engine.step_timer is not None:
        print("step phases:", llm.engine.step_timer.summary())
    if recorder is not None:
        report_timeline(args, recorder.records)
    return elapsed


def step_timeline(llm):
    """The in-process worker's StepTimeline (None with a multi-process executor)."""
    worker = getattr(llm.engine.executor, "worker", None)
    return getattr(getattr(worker, "runner", None), "timeline", None)


def report_timeline(args, records: list) -> None:
    bw, peak = args.bandwidth_gbs * 1e9, args.peak_tflops * 1e12
    csv_path = args.csv or os.path.join(RESULTS_DIR, "throughput.csv")
    stem = f"{os.path.splitext(csv_path)[0]}_timeline_{git_commit()}_{engine_options(args).replace(' ', '_').replace('=', '-')}"
    path = timeline.write_csv(stem + ".csv", records, bw, peak)
    timeline.plot(stem + ".png", records, f"{os.path.basename(os.path.normpath(args.model))} "
                  f"({engine_options(args)}), {len(records)} steps", bw, peak)
    print(f"timeline ({len(records)} steps, CSV: {path}):\n{timeline.format_summary(timeline.summarize(records, bw, peak))}")


def backend_label(args) -> str:
    """'nanovllm', or 'nanovllm (kv=fp8 ...)' when a throughput switch is off its default: the CSV keeps
    its columns and the plot shows each setting of a same-run A/B as its own bar."""
    if args.backend != "nanovllm" or (args.kv_cache_dtype, args.decode_split) == ("auto", "uniform"):
        return args.backend
    return f"nanovllm ({engine_options(args)})"


def engine_options(args) -> str:
    """The throughput switches of a nanovllm run, for the CSV row and file names."""
    return f"kv={args.kv_cache_dtype} split={args.decode_split}"


def run_hf(args, prompts, output_lens) -> float:
    """HF transformers continuous batching (`generate_batch`) on the same prompts.

    generate_batch takes one GenerationConfig, so every sequence generates the workload's
    mean output length; throughput counts the tokens actually produced.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(args.model)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    mean_out = round(sum(output_lens) / len(output_lens))
    gen = GenerationConfig(max_new_tokens=mean_out, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                           pad_token_id=0)
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # generate_batch updates its own buffers in place: no inference_mode
        model.generate_batch(inputs=[prompts[0][:16]], generation_config=warm)
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gen)
        elapsed = time.perf_counter() - t0
    output_lens[:] = [sum(len(r.generated_tokens) for r in out.values())]  # what was actually generated
    args.cuda_graphs = False  # generate_batch runs eagerly
    return elapsed


def run(args) -> int:
    if args.workload == "serve":
        from nanovllm.bench.replay import run_serve_workload

        return run_serve_workload(args)
    from nanovllm.kernels.pdl import pdl_in_effect  # imports triton: only when benchmarking

    prompts, output_lens = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    fn = run_hf if args.backend == "hf" else run_nanovllm
    elapsed = fn(args, prompts, output_lens)
    total = sum(output_lens)
    row = {**base_row(), "backend": backend_label(args), "model": os.path.basename(os.path.normpath(args.model)),
           "num_seqs": args.num_seqs, "input_tokens": sum(map(len, prompts)), "output_tokens": total,
           "seconds": round(elapsed, 2), "output_tok_per_s": round(total / elapsed, 1),
           "cuda_graphs": args.cuda_graphs,
           "async_scheduling": args.async_scheduling if args.backend == "nanovllm" else "",
           "pdl": pdl_in_effect(getattr(args, "pdl", True)) if args.backend == "nanovllm" else "",
           "quantization": getattr(args, "quantization", None) or "",
           "tp": getattr(args, "tp", 1), "executor": getattr(args, "executor", "")}
    path = append_rows(args.csv or os.path.join(RESULTS_DIR, "throughput.csv"), [row])
    plot(path, os.path.splitext(path)[0] + ".png")
    label = args.backend + (f" {args.quantization}" if getattr(args, "quantization", None) else "")
    print(f"{label}: {total} output tokens in {elapsed:.2f} s = {total / elapsed:,.0f} tok/s  (CSV: {path})")
    return 0


def plot(csv_path: str, out_png: str) -> None:
    """Bar chart of the latest row per backend in a throughput CSV."""
    import csv

    latest = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            quant = f" {r['quantization']}" if r.get("quantization") else ""
            latest[f"{r['backend']}{quant} ({r['num_seqs']} seqs)"] = r
    labels = list(latest)
    bar_plot(out_png, labels, [float(latest[k]["output_tok_per_s"]) for k in labels], "output tokens/s",
             f"nano-vLLM bench workload, {latest[labels[0]]['model']} ({latest[labels[0]]['device']})")
