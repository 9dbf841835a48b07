"""Where the time of one decode step goes: torch.profiler over a few engine steps.

Prints the GPU kernel time per kernel class, the step's wall time and GPU busy time (the
difference is host overhead), next to the step's memory-bandwidth limit.

    python benchmarks/profile_decode.py --model benchmarks/configs/qwen3-0.6b --batch 1

`decode_engine` and `profile_steps` are also the measurement of benchmarks/profile_summary.py
(kernel classes per step, fusion on and off).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm import SamplingParams  # noqa: E402
from nanovllm.bench.engines import workload_llm  # noqa: E402
from nanovllm.bench.latency import measure_copy_bandwidth  # noqa: E402

WARM_STEPS = 5  # decode steps after the prefill, before profiling
MODEL_LEN_MARGIN = 256  # decode tokens a request may grow by (warm-up + profiled steps must fit)
TOKEN_ID_MAX = 10000


@dataclass(frozen=True)
class KernelStat:
    name: str
    device_us: float  # GPU microseconds over all profiled steps
    count: int  # launches over all profiled steps


@dataclass(frozen=True)
class DecodeProfile:
    batch: int
    context: int
    steps: int
    wall_ms: float  # per step
    kernels: list  # [KernelStat]

    @property
    def gpu_ms(self) -> float:
        """GPU busy time per step (kernel time; overlapping kernels counted twice)."""
        return sum(k.device_us for k in self.kernels) / self.steps / 1e3


def decode_engine(model: str, max_batch: int, context: int, enforce_eager: bool = False, **kwargs):
    """An engine for decode batches of up to max_batch requests with `context`-token prompts."""
    return workload_llm(model, context + MODEL_LEN_MARGIN, max_batch, enforce_eager=enforce_eager,
                        enable_prefix_caching=False, **kwargs)


def profile_steps(llm, batch: int, context: int, steps: int, trace: str | None = None) -> DecodeProfile:
    """Prefill `batch` requests, decode WARM_STEPS, profile `steps` decode steps, then abort them."""
    eng = llm.engine
    high = min(TOKEN_ID_MAX, eng.hf_config.vocab_size - 1)
    ids = [f"prof-b{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, {"prompt_token_ids": [(i * 31 + j) % high + 1 for j in range(context)]},
                        SamplingParams(temperature=0, max_tokens=MODEL_LEN_MARGIN - 1, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(WARM_STEPS):
        eng.step()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # CPU: the tests' run, no kernels to list
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    if trace:
        prof.export_chrome_trace(trace)
    eng.abort_request(ids)
    while eng.has_unfinished_requests():
        eng.step()
    kernels = [KernelStat(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return DecodeProfile(batch, context, steps, wall * 1e3, kernels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--trace", help="also write the profiler's Chrome trace (JSON) here: gaps between kernels")
    args = ap.parse_args()
    llm = decode_engine(args.model, max(args.batch, 1), args.context, args.enforce_eager)
    prof = profile_steps(llm, args.batch, args.context, args.steps, args.trace)
    print(f"batch {args.batch}, context {args.context}: wall {prof.wall_ms:.3f} ms/step, GPU busy {prof.gpu_ms:.3f} "
          f"ms/step -> host overhead {max(0.0, prof.wall_ms - prof.gpu_ms):.3f} ms")
    info = llm.engine.executor.info
    params = info.param_bytes
    kv = args.batch * (args.context + 100) * info.kv_bytes_per_block // llm.engine.config.block_size
    bandwidth = measure_copy_bandwidth()  # this device's, measured in the same run
    print(f"bandwidth limit: weights {params / 1e9:.2f} GB + KV {kv / 1e9:.3f} GB at {bandwidth / 1e9:,.0f} GB/s -> "
          f"{(params + kv) / bandwidth * 1e3:.3f} ms/step")
    rows = sorted(prof.kernels, key=lambda k: -k.device_us)[:15]
    print(f"{'kernel':<70} {'ms/step':>8} {'calls/step':>10}")
    for k in rows:
        print(f"{k.name[:70]:<70} {k.device_us / args.steps / 1e3:8.3f} {k.count / args.steps:10.1f}")


if __name__ == "__main__":
    main()
