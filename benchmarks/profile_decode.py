"""Where the time of one decode step goes: torch.profiler over a few engine steps.

Prints the GPU kernel time per kernel class, the step's wall time and GPU busy time (the
difference is host overhead), next to the step's memory-bandwidth limit.

    python benchmarks/profile_decode.py --model benchmarks/configs/qwen3-0.6b --batch 1
"""

from __future__ import annotations

import argparse
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench.latency import measure_copy_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--trace", help="also write the profiler's Chrome trace (JSON) here: gaps between kernels")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.context + 256,
              max_num_seqs=max(args.batch, 1), enforce_eager=args.enforce_eager)
    eng = llm.engine
    for i in range(args.batch):
        eng.add_request(f"p{i}", {"prompt_token_ids": [(i * 31 + j) % 10000 for j in range(args.context)]},
                        SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in events) / args.steps / 1e3  # ms per step
    print(f"batch {args.batch}, context {args.context}: wall {wall * 1e3:.3f} ms/step, GPU busy {gpu_total:.3f} ms/step "
          f"-> host overhead {max(0.0, wall * 1e3 - gpu_total):.3f} ms")
    info = eng.executor.info
    params = info.param_bytes
    kv = args.batch * (args.context + 100) * info.kv_bytes_per_block // eng.config.block_size
    bandwidth = measure_copy_bandwidth()  # this device's, measured in the same run
    print(f"bandwidth limit: weights {params / 1e9:.2f} GB + KV {kv / 1e9:.3f} GB at {bandwidth / 1e9:,.0f} GB/s -> "
          f"{(params + kv) / bandwidth * 1e3:.3f} ms/step")
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:15]
    print(f"{'kernel':<70} {'ms/step':>8} {'calls/step':>10}")
    for e in rows:
        print(f"{e.key[:70]:<70} {e.self_device_time_total / args.steps / 1e3:8.3f} {e.count / args.steps:10.1f}")


if __name__ == "__main__":
    main()
