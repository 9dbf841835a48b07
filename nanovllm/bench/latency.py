"""Batch-1 decode latency next to the weight-read roofline.

One request: 128-token prompt, 512 generated tokens, greedy. Reports decode tokens/s and
ms/token (time after the first token), and the roofline = parameter bytes / measured
device-to-device copy bandwidth, as a percentage.

    nanovllm bench latency --model benchmarks/configs/qwen3-0.6b
"""

from __future__ import annotations

import argparse
import os
import time

from nanovllm.bench.report import RESULTS_DIR, append_rows, bar_plot, base_row
from nanovllm.cli.args import add_parallel_args, add_quantization_args, parallel_kwargs, quantization_kwargs

COPY_BYTES = 1 << 30  # 1 GiB buffer for the bandwidth measurement
COPY_REPEATS = 20


def measure_copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    import torch

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(COPY_REPEATS):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / COPY_REPEATS
    return 2 * COPY_BYTES / seconds


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_const", const=False,
                   help="wait for each step's tokens before scheduling the next (the baseline for A/B runs)")
    p.add_argument("--enforce-eager", action="store_true")
    add_parallel_args(p)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="graphs to capture (batch 1 needs few)")
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "latency.csv"))
    add_quantization_args(p)


def memory_report(info, block_size: int) -> tuple[str, dict]:
    """Weight bytes against the unquantized model, and the KV cache tokens the difference buys."""
    if not info.quantization:
        return "", {"quantization": "", "weight_bytes_unquantized": info.param_bytes, "kv_tokens_gained": 0}
    saved = info.param_bytes_unquantized - info.param_bytes
    per_token = info.kv_bytes_per_block / block_size
    gained = int(saved // per_token) if per_token else 0
    text = (f"weights {info.param_bytes / 1e9:.2f} GB ({info.quantization}) vs {info.param_bytes_unquantized / 1e9:.2f} "
            f"GB unquantized: {saved / 1e9:.2f} GB freed = {gained:,} more KV cache tokens "
            f"({per_token / 1024:.0f} KiB each); cache now {info.num_kv_blocks * block_size:,} tokens")
    return text, {"quantization": info.quantization, "weight_bytes_unquantized": info.param_bytes_unquantized,
                  "kv_tokens_gained": gained}


def run(args) -> int:
    import statistics

    import torch

    from nanovllm import LLM, SamplingParams, RequestOutputKind
    from nanovllm.kernels.pdl import pdl_in_effect

    llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling, max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.max_num_seqs, **quantization_kwargs(args), **parallel_kwargs(args))
    engine = llm.engine
    args.async_scheduling = engine.async_scheduling  # what auto resolved to, for the CSV
    prompt = {"prompt_token_ids": [(7 * i + 3) % 10000 for i in range(args.input_len)]}
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    decode_rates = []
    for rep in range(args.repeats):
        engine.add_request(f"lat-{rep}", prompt, params)
        first = None
        n = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                n += len(out.outputs[0].token_ids)
                if first is None and n:
                    first = time.perf_counter()
        last = time.perf_counter()
        decode_rates.append((n - 1) / (last - first))
    rate = statistics.median(decode_rates)
    if engine.step_timer is not None:  # NANOVLLM_STEP_TIMING=1
        print("step phases:", engine.step_timer.summary())
    info = engine.executor.info
    param_bytes = info.active_param_bytes or info.param_bytes  # MoE: top_k experts
    memory_text, memory_cols = memory_report(info, engine.config.block_size)
    bw = measure_copy_bandwidth() if torch.cuda.is_available() else float("nan")
    roofline = bw / param_bytes
    row = {**base_row(), "model": os.path.basename(os.path.normpath(args.model)), "input_len": args.input_len,
           "output_len": args.output_len, "cuda_graphs": not args.enforce_eager,
           "async_scheduling": args.async_scheduling,
           "decode_tok_per_s": round(rate, 1), "ms_per_token": round(1000 / rate, 3),
           "param_bytes": param_bytes, "copy_bw_GBps": round(bw / 1e9, 1), "roofline_tok_per_s": round(roofline, 1),
           "pct_of_roofline": round(100 * rate / roofline, 1), "pdl": pdl_in_effect(engine.config.pdl),
           "tp": engine.config.tensor_parallel_size, "executor": engine.config.executor_backend, **memory_cols}
    path = append_rows(args.csv, [row])
    bar_plot(os.path.splitext(path)[0] + f"_{row['model']}.png", ["nanovllm", "weight-read roofline"],
             [rate, roofline], "decode tokens/s",
             f"batch-1 decode, {row['model']} ({row['device']}): {row['pct_of_roofline']}% of roofline")
    print(f"batch-1 decode: {rate:,.1f} tok/s ({1000 / rate:.3f} ms/token); roofline {roofline:,.0f} tok/s "
          f"({param_bytes / 1e9:.2f} GB params at {bw / 1e9:,.0f} GB/s) -> {100 * rate / roofline:.1f}%  (CSV: {path})")
    if memory_text:
        print(memory_text)
    return 0
